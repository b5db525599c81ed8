"""The coordinator's verbs: create, resume, stop and delete a study (``coordinator``),
and the day-2 changes to a live one (``day2``: limits, pause/resume, reopen, retry-failed,
enqueue, branching). ``hpo_framework.runner`` (``run_hpo``) sits on this layer too. Imports
every layer but ``cli``."""
