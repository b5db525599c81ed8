"""One process runs a study: run_hpo, the trial path, the executor, results, checkpoints,
trackers."""
