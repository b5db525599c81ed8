"""A session module that records each import of itself (``HPO_TEST_PRELOAD_LOG``): the
preload test counts the imports and compares the process that ran them with the session's."""

import os
import time

with open(os.environ["HPO_TEST_PRELOAD_LOG"], "a") as _log:
    _log.write(f"{os.getpid()} {time.time()}\n")


def pid(cfg: dict) -> float:
    return float(os.getpid())


def pid_slowly(cfg: dict) -> float:
    """The executor's pid, after half a second: long enough for every worker of a pool to
    take some of a study's trials."""
    time.sleep(0.5)
    return float(os.getpid())
