"""The user's side of the executor boundary: importing a session by reference
(``reference``), ``trial()`` and ``report`` (``reporting``), and checkpoints with the stores
they live in. Runs inside the executor process, so it imports no database code: the
foundation and ``config`` only."""
