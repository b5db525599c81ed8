#!/bin/sh
# Writes pgbouncer.ini from the environment and runs PgBouncer in the foreground.
# PgBouncer's defaults otherwise: hpo needs no ignore_startup_parameters (it sets its
# connection guards per transaction when a pooler refuses them as startup options).
set -eu
: "${POSTGRES_USER:?set POSTGRES_USER}" "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
dir=$(mktemp -d)
quote() { printf '"%s"' "$(printf '%s' "$1" | sed 's/"/""/g')"; }
echo "$(quote "$POSTGRES_USER") $(quote "$POSTGRES_PASSWORD")" >"$dir/users.txt"
cat >"$dir/pgbouncer.ini" <<INI
[databases]
* = host=${DB_HOST:-postgres} port=${DB_PORT:-5432}

[pgbouncer]
listen_addr = *
listen_port = 6432
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $dir/users.txt
pool_mode = transaction
default_pool_size = ${PGBOUNCER_POOL_SIZE:-20}
max_client_conn = ${PGBOUNCER_MAX_CLIENTS:-1000}
INI
exec pgbouncer "$dir/pgbouncer.ini"
