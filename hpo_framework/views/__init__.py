"""The read side: study summaries behind ``hpo-inspect`` (``inspection``), the live view
(``watch``), plots and the optuna-dashboard launcher. Reads through ``storage``; changes
nothing. Imports the foundation, ``config``, ``storage`` and ``session``."""
