"""A preload module after which ``os.fork`` fails (as it does with EAGAIN on a host out of
processes): the pool's fork server cannot fork, and its workers must start executors fresh."""

import errno
import os


def _fork() -> int:
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))


os.fork = _fork
