"""Entry point of the executor process: ``python -m hpo_framework.runtime._executor_main FD
PARENT [MODULE...]`` (the supervisor's pid, and the modules to preload, from ``HPO_PRELOAD``)."""

import sys

from hpo_framework.runtime.executor import serve_forever

serve_forever(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
