"""``study.on_done`` / ``study.on_failed``: tell someone when a study ends, exactly once.

A hook is a URL (``http(s)://…``: the study's summary is POSTed to it as JSON) or a shell
command (the summary on its stdin; ``HPO_STUDY`` and ``HPO_EVENT`` in its environment). The
process that settles a study's last trial fires it, wherever that is (a worker on any host,
or ``run_hpo``), and so does ``hpo-coordinator stop`` when nothing of the study is running.
Which process fires is decided in the database: the first to insert the study's
``hpo:hook_fired`` attribute. Reopening the study, or raising its budget, arms it again.

The config lives in the database, so a command would run whatever its writer wrote on every
worker host: commands run only where ``HPO_ALLOW_HOOK_COMMANDS=1`` is set (URLs always).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import subprocess
import urllib.request

import optuna
import sqlalchemy as sa

from hpo_framework.config import StudySpec
from hpo_framework.optuna_tables import study_user_attrs
from hpo_framework.registry import FAILED, OPEN, STOPPED, StudyRecord
from hpo_framework.tickets import Tickets

log = logging.getLogger("hpo.hooks")

FIRED_ATTR = "hpo:hook_fired"
HOOK_TIMEOUT_S = 60.0
ALLOW_COMMANDS_ENV = "HPO_ALLOW_HOOK_COMMANDS"


def ended(record: StudyRecord, tickets: Tickets) -> str | None:
    """``"done"`` or ``"failed"`` once the study is over with nothing of it running; else None."""
    if record.state == FAILED:
        return "failed"
    over = record.state == STOPPED or (
        record.state == OPEN
        and ((record.budget is not None and record.claimed >= record.budget) or record.timed_out)
    )
    return "done" if over and tickets.held(record.study_id) == 0 else None


def fire_if_ended(
    storage: optuna.storages.RDBStorage, record: StudyRecord, spec: StudySpec
) -> None:
    """Fire the study's hook if it has just ended and no process fired it yet."""
    event = ended(record, Tickets(storage.engine))
    hook = {"done": spec.on_done, "failed": spec.on_failed}.get(event or "")
    if event is None or not hook:
        return
    at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    try:
        with storage.engine.begin() as conn:
            conn.execute(
                study_user_attrs.insert().values(
                    study_id=record.study_id,
                    key=FIRED_ATTR,
                    value_json=json.dumps({"event": event, "at": at}),
                )  # fmt: skip
            )
    except sa.exc.IntegrityError:
        return  # another process fired it
    from hpo_framework.inspection import summarize  # the read side, only when a hook fires

    text = json.dumps({"event": event, **summarize(storage, record.name)}, default=str)
    run_hook(hook, text, record.name, event)


def rearm(storage: optuna.storages.RDBStorage, study_id: int) -> None:
    """The study goes on: its hook may fire again when it next ends."""
    a = study_user_attrs.c
    with storage.engine.begin() as conn:
        conn.execute(study_user_attrs.delete().where(a.study_id == study_id, a.key == FIRED_ATTR))


def run_hook(hook: str, text: str, study: str, event: str) -> None:
    """POST ``text`` to a URL, or run a command with it on stdin; failures are logged."""
    try:
        if hook.startswith(("http://", "https://")):
            request = urllib.request.Request(
                hook, data=text.encode(), headers={"Content-Type": "application/json"},
                method="POST",
            )  # fmt: skip
            with urllib.request.urlopen(request, timeout=HOOK_TIMEOUT_S) as response:
                log.info("study=%s on_%s: POST %s: %d", study, event, hook, response.status)
            return
        if os.environ.get(ALLOW_COMMANDS_ENV) != "1":
            log.warning(
                "study=%s on_%s not run: commands run only where %s=1 is set",
                study, event, ALLOW_COMMANDS_ENV,
            )  # fmt: skip
            return
        done = subprocess.run(
            hook, shell=True, input=text, text=True, capture_output=True,  # noqa: S602
            timeout=HOOK_TIMEOUT_S, env={**os.environ, "HPO_STUDY": study, "HPO_EVENT": event},
        )  # fmt: skip
        if done.returncode != 0:
            log.warning(
                "study=%s on_%s exited %d: %s",
                study, event, done.returncode, done.stderr.strip()[-500:],
            )  # fmt: skip
        else:
            log.info("study=%s on_%s ran", study, event)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("study=%s on_%s failed: %s", study, event, e)
