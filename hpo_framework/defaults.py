"""The framework's intervals, timeouts and limits that an operator may want to look up or
change: config keys (``study.heartbeat_interval`` ...) override the per-study values,
environment variables the per-process ones. Constants that only shape one module's own
mechanism (a retry's jitter, a log line's rate) stay beside the code they shape.
"""

from __future__ import annotations

import os

#: The longest error text kept on a trial or a study (the rest of a long traceback is cut).
ERROR_TEXT_MAX = 2000

#: Storage used when neither ``--storage``, ``HPO_STORAGE`` nor ``storage:`` names one.
STORAGE_URL = "sqlite:///hpo.db"
STORAGE_ENV = "HPO_STORAGE"

#: Module prefixes a worker may import a session from (``HPO_SESSION_MODULES``, comma separated).
SESSION_MODULES = ("experiments",)
SESSION_MODULES_ENV = "HPO_SESSION_MODULES"
#: Modules the executor imports as it starts, before any study is known (``HPO_PRELOAD``,
#: comma separated; ``hpo-worker --preload``): a session's heavy imports (torch) overlap the
#: worker's own start and its wait for work, instead of following them.
PRELOAD_ENV = "HPO_PRELOAD"
#: Set to 0 to have a pool's workers start their executors fresh instead of forking them from
#: one process per pool that imported the preload modules once (``HPO_FORKSERVER``).
FORKSERVER_ENV = "HPO_FORKSERVER"
#: Set to 1 to allow samplers that unpickle state stored in the database (``cmaes``).
ALLOW_PICKLE_ENV = "HPO_UNSAFE_ALLOW_PICKLE"

# Per-study values, overridable in config.yaml under ``study:``.
N_TRIALS = 50
MAX_FAILED_TRIALS = 10
HEARTBEAT_INTERVAL = 5.0  # seconds between two heartbeats of a running trial
GRACE_PERIOD = 20.0  # a running trial silent this long is failed and its params retried
MAX_RETRIES = 2  # re-evaluations of one failed trial's parameters

# Per-process values of the worker.
IDLE_POLL_MIN = 0.1  # first wait when no study has work (seconds)
IDLE_POLL_MAX = float(os.environ.get("HPO_IDLE_POLL_MAX", "0.25"))  # cap of the idle backoff
SCHEMA_WAIT_LOG_EVERY = 30.0  # how often a waiting worker repeats its "waiting" line
#: Seconds between two refreshes of a worker's hpo_workers row; 3 missed ones: "lost".
PRESENCE_EVERY_S = float(os.environ.get("HPO_PRESENCE_INTERVAL", "10"))

# Database resilience.
DB_RETRY_MAX_WAIT = 5.0  # cap of the exponential backoff between two tries
DB_RETRY_DEADLINE = float(os.environ.get("HPO_DB_RETRY_DEADLINE", "600"))  # give up after
#: After a worker's first SIGTERM/SIGINT, a database step waits at most this long for an
#: unreachable database, then the worker leaves its trial to the stale sweep and exits 1
#: (well under compose's stop_grace_period of 10 min, and Kubernetes' default 30 s is the
#: orchestrator's own: set terminationGracePeriodSeconds above this).
STOP_DB_WAIT_S = float(os.environ.get("HPO_STOP_DB_WAIT", "20"))
SQLITE_BUSY_TIMEOUT_S = 60.0
#: How often a live process looks for lost workers' tickets (seconds).
SWEEP_INTERVAL_S = 1.0

# Settings of every hpo connection to PostgreSQL (seconds).
PG_CONNECT_TIMEOUT_S = 10
PG_KEEPALIVE_IDLE_S, PG_KEEPALIVE_INTERVAL_S, PG_KEEPALIVE_COUNT = 30, 10, 3
PG_TCP_USER_TIMEOUT_S = 60.0  # unacknowledged data this long: the connection is dead
PG_LOCK_TIMEOUT_S = float(os.environ.get("HPO_PG_LOCK_TIMEOUT", "10"))
#: A transaction of a frozen process (SIGSTOP, a paused VM) holds its locks at most this long.
PG_IDLE_IN_TRANSACTION_TIMEOUT_S = float(os.environ.get("HPO_PG_IDLE_IN_TRANSACTION_TIMEOUT", "5"))

#: Connections a worker process may hold: one for the trial loop, one for the heartbeat.
POOL_SIZE = 1
POOL_MAX_OVERFLOW = 1
POOL_TIMEOUT_S = 60.0
