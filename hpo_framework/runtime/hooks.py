"""``study.on_done`` / ``study.on_failed``: tell someone when a study ends, exactly once.

A hook is a URL (``http(s)://…``: the study's summary is POSTed to it as JSON) or a shell
command (the summary on its stdin; ``HPO_STUDY`` and ``HPO_EVENT`` in its environment). The
process that settles a study's last trial fires it, wherever that is (a worker on any host,
or ``run_hpo``), and so does ``hpo-coordinator stop`` when nothing of the study is running.
Which process fires is decided in the database: the first to insert the study's
``hpo:hook_fired`` attribute. Reopening the study, or raising its budget, arms it again.

The config lives in the database, so a command would run whatever its writer wrote on every
worker host, and a URL would make every host send the study's summary wherever its writer
chose: commands run only where ``HPO_ALLOW_HOOK_COMMANDS=1`` is set, and URLs are POSTed only
under one of the host's ``HPO_HOOK_URLS`` prefixes, with a short timeout, never following a
redirect. A process that may not fire a hook does not claim it (another may); it says why
once. The body is the summary as JSON, with a one-line ``text`` beside it, which chat
webhooks (Slack, Mattermost, Teams...) show as the message.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import subprocess
import urllib.error
import urllib.request
from typing import Any

import optuna

from hpo_framework.config.host_policy import hook_url_refusal
from hpo_framework.storage.backend import Backend
from hpo_framework.storage.optuna_tables import study_user_attrs
from hpo_framework.storage.registry import FAILED, OPEN, STOPPED, StudyRecord

log = logging.getLogger("hpo.hooks")

FIRED_ATTR = "hpo:hook_fired"
HOOK_TIMEOUT_S = 60.0  # a command's
URL_TIMEOUT_S = 10.0  # a POST's: connect and each read
ALLOW_COMMANDS_ENV = "HPO_ALLOW_HOOK_COMMANDS"
_said: set[tuple[int, str, str]] = set()  # (study, event, hook) refused and said so already


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


def fire_if_ended(backend: Backend, study_id: int) -> None:
    """Fire the study's hook if it has ended and no process fired it yet. Reads nothing more
    than the study's row when the study has no hook."""
    registry = backend.registry
    record = registry.by_id(study_id)
    if record is None or hooks_of(record) == (None, None):
        return
    if record.state != FAILED:  # nothing may be running for "done": then read the row again
        if backend.tickets.held(study_id) > 0:
            return
        record = registry.by_id(study_id)
        if record is None:
            return
    event = ended(record)
    on_done, on_failed = hooks_of(record)
    hook = on_failed if event == "failed" else on_done
    if event is None or not hook:
        return
    refusal = _refusal(hook)
    if refusal:
        if (record.study_id, event, hook) not in _said:
            _said.add((record.study_id, event, hook))
            log.warning(
                "study=%s on_%s not run here: %s (left to a process allowed to fire it)",
                record.name, event, refusal,
            )  # fmt: skip
        return
    at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    fired = {"event": event, "at": at}
    if not backend.set_study_attr_once(record.study_id, FIRED_ATTR, fired):
        return  # another process fired it
    from hpo_framework.views.inspection import summarize  # the read side, only when a hook fires

    summary = summarize(backend.storage, record.name)
    body = {"text": one_line(event, summary), "event": event, **summary}
    run_hook(hook, json.dumps(body, default=str), record.name, event)


def _is_url(hook: str) -> bool:
    return hook.startswith(("http://", "https://"))


def _refusal(hook: str) -> str | None:
    """Why this process may not fire ``hook``, or None."""
    if _is_url(hook):
        return hook_url_refusal(hook)
    if os.environ.get(ALLOW_COMMANDS_ENV) != "1":
        return f"commands run only where {ALLOW_COMMANDS_ENV}=1 is set"
    return None


def one_line(event: str, summary: dict[str, Any]) -> str:
    """The summary as a chat message: ``hpo: study 'x' done: 20/20 finished, 1 failed;
    best 0.0123 (trial 7)``."""
    counts = summary.get("counts", {})
    budget = summary.get("budget")
    text = (
        f"hpo: study {summary.get('study')!r} {event}: {summary.get('finished', 0)}"
        f"{'' if budget is None else f'/{budget}'} finished, {counts.get('FAIL', 0)} failed"
    )
    best = summary.get("best") or []
    if len(best) == 1 and best[0].get("values"):
        values = ", ".join(f"{v:.6g}" for v in best[0]["values"])
        text += f"; best {values} (trial {best[0]['number']})"
    if summary.get("study_error"):
        text += f"; {summary['study_error']}"
    return text


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx is the answer, not a new address to send the summary to."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


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
            try:
                with _OPENER.open(request, timeout=URL_TIMEOUT_S) as response:
                    status = response.status
            except urllib.error.HTTPError as e:  # a redirect too: not followed
                status = e.code
                e.close()
            level = logging.INFO if status < 300 else logging.WARNING
            log.log(level, "study=%s on_%s: POST %s: %d", study, event, hook, status)
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
