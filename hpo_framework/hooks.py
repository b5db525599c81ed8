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

from hpo_framework.optuna_tables import study_user_attrs
from hpo_framework.registry import FAILED, OPEN, STOPPED, Registry, StudyRecord
from hpo_framework.tickets import Tickets

log = logging.getLogger("hpo.hooks")

FIRED_ATTR = "hpo:hook_fired"
HOOK_TIMEOUT_S = 60.0
ALLOW_COMMANDS_ENV = "HPO_ALLOW_HOOK_COMMANDS"


def ended(record: StudyRecord) -> str | None:
    """``"done"`` or ``"failed"`` if the study is over, judged from its row alone (read after
    seeing no ticket held: a ticket is returned in the same statement that gives its budget
    back, so a failure that re-queues its point never looks like the end)."""
    if record.state == FAILED:
        return "failed"
    over = record.state == STOPPED or (
        record.state == OPEN
        and ((record.budget is not None and record.claimed >= record.budget) or record.timed_out)
    )
    return "done" if over else None


def hooks_of(record: StudyRecord) -> tuple[str | None, str | None]:
    """The study's ``on_done`` and ``on_failed``, from its stored config."""
    study = record.config.get("study") or {}
    return study.get("on_done"), study.get("on_failed")


def fire_if_ended(storage: optuna.storages.RDBStorage, study_id: int) -> None:
    """Fire the study's hook if it has ended and no process fired it yet. Reads nothing more
    than the study's row when the study has no hook."""
    registry = Registry(storage.engine)
    record = registry.by_id(study_id)
    if record is None or hooks_of(record) == (None, None):
        return
    if record.state != FAILED:  # nothing may be running for "done": then read the row again
        if Tickets(storage.engine).held(study_id) > 0:
            return
        record = registry.by_id(study_id)
        if record is None:
            return
    event = ended(record)
    on_done, on_failed = hooks_of(record)
    hook = on_failed if event == "failed" else on_done
    if event is None or not hook:
        return
    if not _is_url(hook) and os.environ.get(ALLOW_COMMANDS_ENV) != "1":
        log.warning(
            "study=%s on_%s not run here: commands run only where %s=1 is set (a process "
            "that has it may still run it)", record.name, event, ALLOW_COMMANDS_ENV,
        )  # fmt: skip
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


def _is_url(hook: str) -> bool:
    return hook.startswith(("http://", "https://"))


def rearm(storage: optuna.storages.RDBStorage, study_id: int) -> None:
    """The study goes on: its hook may fire again when it next ends."""
    a = study_user_attrs.c
    with storage.engine.begin() as conn:
        conn.execute(study_user_attrs.delete().where(a.study_id == study_id, a.key == FIRED_ATTR))


def run_hook(hook: str, text: str, study: str, event: str) -> None:
    """POST ``text`` to a URL, or run a command with it on stdin; failures are logged."""
    try:
        if _is_url(hook):
            request = urllib.request.Request(
                hook, data=text.encode(), headers={"Content-Type": "application/json"},
                method="POST",
            )  # fmt: skip
            with urllib.request.urlopen(request, timeout=HOOK_TIMEOUT_S) as response:
                log.info("study=%s on_%s: POST %s: %d", study, event, hook, response.status)
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
    except (OSError, ValueError, subprocess.TimeoutExpired) as e:  # InvalidURL: a ValueError
        log.warning("study=%s on_%s failed: %s", study, event, e)
