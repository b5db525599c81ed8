"""The database: every SQL statement hpo runs and every access to Optuna's private tables
and storage internals. ``database`` opens storages and owns the retry policy; ``registry``,
``tickets`` and ``presence`` are hpo's own tables; ``optuna_tables``, ``trial_store`` and
``trial_sync`` are Optuna's, as a worker uses them, and ``trial_reads`` as the read side
shows them (without importing Optuna); ``pg_guards`` keeps PostgreSQL's
timeouts and clock behind a pooler too. Imports the foundation and ``config`` only."""
