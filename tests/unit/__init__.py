"""Fast checks with no database server or Docker engine: config, search space, layers, the
CLI's documentation (``make test-fast``)."""
