"""Entry point of a pool's fork server: ``python -m hpo_framework.runtime._forkserver_main FD
[MODULE...]`` (the pool's control connection, and the modules to preload, from ``HPO_PRELOAD``)."""

import sys

from hpo_framework.runtime.forkserver import serve

serve(int(sys.argv[1]), sys.argv[2:])
