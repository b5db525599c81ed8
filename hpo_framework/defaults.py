"""Every interval, timeout and limit of the framework, in one place.

Config keys (``study.heartbeat_interval`` ...) override the per-study values; environment
variables override the per-process ones. Nothing else in the package hard-codes a number.
"""

from __future__ import annotations

import os

#: Storage used when neither ``--storage``, ``HPO_STORAGE`` nor ``storage:`` names one.
STORAGE_URL = "sqlite:///hpo.db"
STORAGE_ENV = "HPO_STORAGE"

#: Module prefixes a worker may import a session from (``HPO_SESSION_MODULES``, comma separated).
SESSION_MODULES = ("experiments",)
SESSION_MODULES_ENV = "HPO_SESSION_MODULES"

# Per-study values, overridable in config.yaml under ``study:``.
N_TRIALS = 50
MAX_FAILED_TRIALS = 10
HEARTBEAT_INTERVAL = 5.0  # seconds between two heartbeats of a running trial
GRACE_PERIOD = 20.0  # a running trial silent this long is failed and its params retried
MAX_RETRIES = 2  # re-evaluations of one failed trial's parameters
#: Allowance for worker clocks when judging trials by Optuna's start time (workers' clocks).
CLOCK_SKEW_S = 60.0
#: A claimed ticket not turned into a heartbeat-covered trial within this long is handed back
#: (its worker died in between). Claim to cover takes milliseconds, but a host with many more
#: workers than cores can stall a process for seconds, so this is far above grace_period.
LEASE_TIMEOUT_S = float(os.environ.get("HPO_LEASE_TIMEOUT", "60"))

# Per-process values of the worker.
IDLE_POLL_MIN = 0.1  # first wait when no study has work (seconds)
IDLE_POLL_MAX = float(os.environ.get("HPO_IDLE_POLL_MAX", "0.25"))  # cap of the idle backoff
SCHEMA_WAIT_LOG_EVERY = 30.0  # how often a waiting worker repeats its "waiting" line

# Database resilience.
DB_RETRY_MAX_WAIT = 5.0  # cap of the exponential backoff between two tries
DB_RETRY_DEADLINE = float(os.environ.get("HPO_DB_RETRY_DEADLINE", "600"))  # give up after
SQLITE_BUSY_TIMEOUT_S = 60.0

#: Connections a worker process may hold: one for the trial loop, one for the heartbeat.
POOL_SIZE = 1
POOL_MAX_OVERFLOW = 1
POOL_TIMEOUT_S = 60.0
