"""Click adapters only: ``hpo-coordinator`` (``commands``), ``hpo-inspect`` (``inspecting``,
which imports no Optuna for a study of one objective) and what the commands share: options,
the checks before reading a database, error translation (``options``). Imports anything;
nothing imports it but the ``workers`` entry."""
