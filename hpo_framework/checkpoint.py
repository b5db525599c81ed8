"""``checkpoint.save(state)`` / ``checkpoint.load()``: long trials that survive their worker.

A session saves its state as it goes (each epoch); when its trial is retried because the worker
was lost (``kill -9``, preemption, an OOM kill, a frozen host) or the session failed, the
retry's ``load()`` returns the last state saved for that *point* (the retried parameters), so
the session carries on from there instead of from epoch 0. Outside a trial, or for a study
without ``checkpoints:`` in its config, ``save`` does nothing and ``load`` returns None.

Files live under ``checkpoints.dir`` (a directory every worker sees: a shared volume), one per
point, written atomically (a temporary file, fsync, rename), so a kill mid-save leaves the
previous checkpoint intact. The state is pickled: like ``torch.load``, load only checkpoints of
a directory nobody untrusted can write. The worker removes the checkpoints of finished trials,
except those of the best ``checkpoints.keep_best``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from hpo_framework.reporting import current_info


def _target() -> Path | None:
    where = current_info().get("checkpoint")
    return None if where is None else Path(where)


def save(state: Any) -> None:
    """Replace this trial's checkpoint with ``state`` (anything picklable: a dict of tensors,
    the epoch, the optimizer's state...)."""
    target = _target()
    if target is None:
        return
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def load() -> Any | None:
    """The state last saved for this trial's point (by an earlier attempt), or None."""
    target = _target()
    if target is None or not target.exists():
        return None
    with open(target, "rb") as f:
        return pickle.load(f)  # noqa: S301 (the study's own checkpoints; see the module doc)
