"""Entry point of the executor process: ``python -m hpo_framework.runtime._executor_main FD
[MODULE...]`` (the modules to preload, from ``HPO_PRELOAD``)."""

import sys

from hpo_framework.runtime.executor import serve_forever

serve_forever(int(sys.argv[1]), sys.argv[2:])
