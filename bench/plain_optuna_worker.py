"""The baseline: the idiomatic plain-Optuna worker on shared storage, with every guarantee
Optuna itself offers (heartbeat + retry of stale trials, MaxTrialsCallback for the budget).

    python bench/plain_optuna_worker.py URL STUDY N_TRIALS SLEEP_S SEED
"""

from __future__ import annotations

import sys
import time

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState


def objective(trial: optuna.Trial, sleep_s: float) -> float:
    x = trial.suggest_float("x", -5.0, 5.0)
    if sleep_s:
        time.sleep(sleep_s)
    return (x - 2) ** 2


def main() -> None:
    url, name, n_trials, sleep_s, seed = (
        sys.argv[1],
        sys.argv[2],
        int(sys.argv[3]),
        float(sys.argv[4]),
        int(sys.argv[5]),
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = RDBStorage(
        url,
        heartbeat_interval=5,
        grace_period=20,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
    )
    study = optuna.load_study(
        study_name=name, storage=storage,
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=10),
    )  # fmt: skip
    study.optimize(
        lambda t: objective(t, sleep_s),
        callbacks=[MaxTrialsCallback(n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED))],
    )


if __name__ == "__main__":
    main()
