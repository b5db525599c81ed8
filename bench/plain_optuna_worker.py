"""The baseline: the idiomatic plain-Optuna worker on shared storage, with every guarantee
Optuna itself offers (heartbeat + retry of stale trials, MaxTrialsCallback for the budget).

    python bench/plain_optuna_worker.py URL STUDY N_TRIALS SLEEP_S SEED [MODULE]

MODULE, if given, is imported first, as a script whose objective uses it (torch) would.

Like an hpo worker, it starts before the study exists: it connects, prints ``ready`` and
waits for the study, so the benchmark's clock starts with both sides' workers waiting.
"""

from __future__ import annotations

import importlib
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
    if len(sys.argv) > 6:
        importlib.import_module(sys.argv[6])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = RDBStorage(
        url,
        heartbeat_interval=5,
        grace_period=20,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
    )
    print("ready", flush=True)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=10)
    while True:  # polled as often as an idle hpo worker polls (0.1 s, then up to 0.25 s)
        try:
            study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
            break
        except KeyError:
            time.sleep(0.1)
    study.optimize(
        lambda t: objective(t, sleep_s),
        callbacks=[MaxTrialsCallback(n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED))],
    )


if __name__ == "__main__":
    main()
