"""Where trials run: the one trial loop (``trials``), the executor process that runs
sessions, the heartbeat, settling failures, recovering lost workers' tickets, stop rules,
hooks, trackers, the worker's health file and progress bar, and ``serving``, the one door
the ``workers`` package goes through. Imports every layer below it (foundation, ``config``,
``storage``, ``session``, ``views``), never ``operations`` or ``cli``."""
