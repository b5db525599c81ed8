"""Worker pools on real PostgreSQL and SQLite: scale, poolers, the database cost of a trial."""
