"""What a study is, checked without a database: config.yaml read into a ``Config``
(``schema``), the sampler and pruner named there (``algorithms``), and what this host's
operator allows (``host_policy``). The search space is ``hpo_framework.param_sampler``, the
seed's module; ``param_tree`` holds what needs no Optuna (names and nesting, and a stored
config's space as the read side sees it). Imports the foundation and ``param_sampler`` only."""
