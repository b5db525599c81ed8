"""A session module that records each import of itself (``HPO_TEST_PRELOAD_LOG``): the
preload test counts the imports and compares the process that ran them with the session's."""

import os
import time

with open(os.environ["HPO_TEST_PRELOAD_LOG"], "a") as _log:
    _log.write(f"{os.getpid()} {time.time()}\n")


def pid(cfg: dict) -> float:
    return float(os.getpid())
