"""``checkpoint.save(state)`` / ``checkpoint.load()``: long trials that survive their worker.

A session saves its state as it goes (each epoch); when its trial is retried because the worker
was lost (``kill -9``, preemption, an OOM kill, a frozen host) or the session failed, the
retry's ``load()`` returns the last state saved for that *point* (the retried parameters), so
the session carries on from there instead of from epoch 0. Outside a trial, or for a study
without ``checkpoints:`` in its config, ``save`` does nothing and ``load`` returns None.

Checkpoints live in one of Optuna's artifact stores (``checkpoint_store``): a directory every
worker sees (``checkpoints.dir``, a shared volume) or S3 and S3-compatible services
(``checkpoints.s3``), one artifact per point, replaced whole by each save, so a kill mid-save
leaves the previous checkpoint intact.

The state is pickled, and the study's config (which names the store) comes from the database:
so each checkpoint ends with an HMAC-SHA256 of its bytes and its name under a key that only
the workers hold (``host_policy.checkpoint_key``), checked before a byte is unpickled or handed
to the session. A checkpoint that fails the check, or cannot be read (truncated, corrupt), is
set aside as ``<name>.rejected`` with a warning naming it, and the point starts from scratch.
The worker removes the checkpoints of finished trials, except those of the best
``checkpoints.keep_best``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import pickle
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from hpo_framework.config.host_policy import checkpoint_key
from hpo_framework.session.checkpoint_store import (
    ArtifactNotFound,
    AtomicFileSystemArtifactStore,
    open_store,
    replace_file,
)
from hpo_framework.session.reporting import current_info

log = logging.getLogger("hpo.checkpoint")

_PROTOCOL = pickle.HIGHEST_PROTOCOL
#: Each checkpoint ends with its MAC (32 bytes) and this mark.
_MARK = b"hpo-ckpt-v1\n"
_TRAILER = 32 + len(_MARK)
_SPOOL = 64 << 20  # what a checkpoint may take in memory before it goes to a temporary file


def save(state: Any) -> None:
    """Replace this trial's checkpoint with ``state`` (anything picklable: a dict of tensors,
    the epoch, the optimizer's state...)."""
    target = current_info().get("checkpoint")
    if target is not None:
        _write(target, "pickle", lambda f: pickle.dump(state, f, _PROTOCOL))


def load() -> Any | None:
    """The state last saved for this trial's point (by an earlier attempt), or None: also
    when the checkpoint fails its check or cannot be unpickled (it is set aside, named in a
    warning, and the point starts from scratch)."""
    target = current_info().get("checkpoint")
    if target is None:
        return None
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL) as body:
        if not _read_verified(target, "pickle", body):  # type: ignore[arg-type]
            return None
        body.seek(0)
        try:
            # checked above: written by a worker holding this pool's key
            return pickle.load(body)  # noqa: S301
        except Exception as e:  # noqa: BLE001 - a class renamed since, a bug of a past save...
            _set_aside(target, f"cannot be unpickled ({type(e).__name__}: {e})")
            return None


def save_file(path: str | os.PathLike[str]) -> None:
    """Replace this trial's checkpoint with the file at ``path``: what ``torch.save`` or a
    library's own ``save_model`` wrote. Pairs with :func:`load_file`, not with ``load``."""
    with open(path, "rb") as f:  # a wrong path fails outside a trial too
        target = current_info().get("checkpoint")
        if target is not None:
            _write(target, "file", lambda dst: _copy(f, dst))


def load_file(path: str | os.PathLike[str]) -> bool:
    """Write the file last saved with :func:`save_file` for this trial's point to ``path``;
    False (and ``path`` untouched) when there is none, or when it fails its check (set
    aside, as for ``load``). A download broken midway leaves ``path`` as it was."""
    target = current_info().get("checkpoint")
    if target is None:
        return False
    destination = Path(os.path.abspath(path))
    verified = False

    def fill(dst: BinaryIO) -> None:
        nonlocal verified
        verified = _read_verified(target, "file", dst)
        if not verified:
            raise _Rejected  # replace_file leaves ``path`` as it was

    with contextlib.suppress(_Rejected):
        replace_file(destination, fill)
    return verified


class _Rejected(Exception):
    """The checkpoint failed its check (already set aside and logged)."""


def _mac(target: dict[str, str], kind: str) -> hmac.HMAC:
    """The MAC of a checkpoint, begun with its name and kind: one point's checkpoint cannot
    stand in for another's, nor a file saved with ``save_file`` for a pickle."""
    head = f"{target['id']}\n{kind}\n".encode()
    return hmac.new(checkpoint_key(), head, hashlib.sha256)


def _write(target: dict[str, str], kind: str, fill: Callable[[BinaryIO], object]) -> None:
    """Replace the checkpoint with what ``fill`` writes, followed by its MAC."""
    mac = _mac(target, kind)

    def signed(f: BinaryIO) -> None:
        fill(_Signing(f, mac))  # type: ignore[arg-type]
        f.write(mac.digest() + _MARK)

    store = open_store(target)
    if isinstance(store, AtomicFileSystemArtifactStore):  # straight into the file
        store.write_with(target["id"], signed)
        return
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL) as body:  # then uploaded from there
        signed(body)  # type: ignore[arg-type]
        body.seek(0)
        store.write(target["id"], body)  # type: ignore[arg-type]


class _Signing:
    """A file to write that feeds the MAC what passes through it."""

    def __init__(self, f: BinaryIO, mac: hmac.HMAC) -> None:
        self._f, self._mac = f, mac

    def write(self, data: bytes) -> int:
        self._mac.update(data)
        return self._f.write(data)


def _read_verified(target: dict[str, str], kind: str, dst: BinaryIO) -> bool:
    """Copy the checkpoint's content (without its MAC) into ``dst``; True if it was there
    and passed its check, False if there is none or it failed (then it is set aside)."""
    try:
        reader = open_store(target).open_reader(target["id"])
    except ArtifactNotFound:
        return False
    mac, tail = _mac(target, kind), b""
    with reader as src:
        for chunk in _chunks(src):
            held = tail + chunk  # the last bytes may be the trailer: held back until the end
            out, tail = held[:-_TRAILER], held[-_TRAILER:]
            mac.update(out)
            dst.write(out)
    if len(tail) < _TRAILER or not tail.endswith(_MARK):
        _set_aside(target, "is not a checkpoint of this version whole (truncated or foreign)")
        return False
    if not hmac.compare_digest(tail[:32], mac.digest()):
        _set_aside(target, f"fails its MAC (not a {kind} written with this pool's checkpoint key)")
        return False
    return True


def _chunks(src: BinaryIO) -> Iterator[bytes]:
    while chunk := src.read(1 << 20):
        yield chunk


def _copy(src: BinaryIO, dst: BinaryIO) -> None:
    for chunk in _chunks(src):
        dst.write(chunk)


def _set_aside(target: dict[str, str], why: str) -> None:
    """Move a checkpoint that cannot be used to ``<name>.rejected`` (for its operator to
    look at; never read again), so the point starts from scratch."""
    name = target["id"]
    where = target.get("dir") or target.get("s3")
    log.warning("checkpoint %s in %s %s: set aside as %s.rejected; the point starts from "
                "scratch", name, where, why, name)  # fmt: skip
    try:
        store = open_store(target)
        with store.open_reader(name) as f:
            store.write(f"{name}.rejected", f)
        store.remove(name)
    except Exception as e:  # noqa: BLE001 - the trial goes on from scratch all the same
        log.warning("checkpoint %s not set aside: %s", name, e)
