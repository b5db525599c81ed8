"""``checkpoint.save(state)`` / ``checkpoint.load()``: long trials that survive their worker.

A session saves its state as it goes (each epoch); when its trial is retried because the worker
was lost (``kill -9``, preemption, an OOM kill, a frozen host) or the session failed, the
retry's ``load()`` returns the last state saved for that *point* (the retried parameters), so
the session carries on from there instead of from epoch 0. Outside a trial, or for a study
without ``checkpoints:`` in its config, ``save`` does nothing and ``load`` returns None.

Checkpoints live in one of Optuna's artifact stores (``checkpoint_store``): a directory every
worker sees (``checkpoints.dir``, a shared volume) or S3 and S3-compatible services
(``checkpoints.s3``), one artifact per point, replaced whole by each save, so a kill mid-save
leaves the previous checkpoint intact. The state is pickled: like ``torch.load``, load only
checkpoints of a store nobody untrusted can write. The worker removes the checkpoints of
finished trials, except those of the best ``checkpoints.keep_best``.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from hpo_framework.checkpoint_store import (
    ArtifactNotFound,
    AtomicFileSystemArtifactStore,
    open_store,
    replace_file,
)
from hpo_framework.reporting import current_info

_PROTOCOL = pickle.HIGHEST_PROTOCOL


def save(state: Any) -> None:
    """Replace this trial's checkpoint with ``state`` (anything picklable: a dict of tensors,
    the epoch, the optimizer's state...)."""
    target = current_info().get("checkpoint")
    if target is None:
        return
    store = open_store(target)
    if isinstance(store, AtomicFileSystemArtifactStore):  # pickled straight into the file
        store.write_with(target["id"], lambda f: pickle.dump(state, f, _PROTOCOL))
        return
    # Pickled into a temporary file (in memory up to 64 MB), then uploaded from there.
    with tempfile.SpooledTemporaryFile(max_size=64 << 20) as body:
        pickle.dump(state, body, _PROTOCOL)
        body.seek(0)
        store.write(target["id"], body)  # type: ignore[arg-type]


def load() -> Any | None:
    """The state last saved for this trial's point (by an earlier attempt), or None."""
    reader = _reader()
    if reader is None:
        return None
    with reader as f:
        # the study's own checkpoints; see the module doc
        return pickle.loads(f.read())  # noqa: S301


def save_file(path: str | os.PathLike[str]) -> None:
    """Replace this trial's checkpoint with the file at ``path``: what ``torch.save`` or a
    library's own ``save_model`` wrote. Pairs with :func:`load_file`, not with ``load``."""
    with open(path, "rb") as f:  # a wrong path fails outside a trial too
        target = current_info().get("checkpoint")
        if target is not None:
            open_store(target).write(target["id"], f)


def load_file(path: str | os.PathLike[str]) -> bool:
    """Write the file last saved with :func:`save_file` for this trial's point to ``path``;
    False (and ``path`` untouched) when there is none. A download broken midway leaves
    ``path`` as it was."""
    reader = _reader()
    if reader is None:
        return False
    with reader as src:
        replace_file(Path(os.path.abspath(path)), lambda dst: shutil.copyfileobj(src, dst))
    return True


def _reader() -> BinaryIO | None:
    """This trial's checkpoint, open for reading; None outside a trial or before any save."""
    target = current_info().get("checkpoint")
    if target is None:
        return None
    try:
        return open_store(target).open_reader(target["id"])
    except ArtifactNotFound:
        return None
