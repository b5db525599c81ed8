"""Where checkpoints live: one of Optuna's artifact stores, chosen by ``checkpoints:``.

``checkpoints.dir`` is a directory every worker sees (a shared volume); ``checkpoints.s3`` is
``s3://bucket/prefix`` on S3 or any S3-compatible service (MinIO, Ceph, R2...), reached at
``checkpoints.endpoint_url`` when given, with the credentials boto3 finds in the environment
(``AWS_ACCESS_KEY_ID``... never in config.yaml). A checkpoint is one artifact per point, named
``study-<id>/point-<n>.pkl``; a save replaces it whole or not at all: an S3 PUT is atomic, and
the directory store writes a temporary file, fsyncs and renames (Optuna's own
``FileSystemArtifactStore.write`` truncates the file in place, so a kill mid-save would tear it).
"""

from __future__ import annotations

import functools
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from hpo_framework.config.host_policy import checkpoint_location_refusal, s3_endpoint_refusal

if TYPE_CHECKING:
    from optuna.artifacts import FileSystemArtifactStore
    from optuna.artifacts._protocol import ArtifactStore
    from optuna.artifacts.exceptions import ArtifactNotFound

    from hpo_framework.config.schema import CheckpointSpec

    class AtomicFileSystemArtifactStore(FileSystemArtifactStore):
        def write_with(self, artifact_id: str, fill: Callable[[BinaryIO], object]) -> None: ...


__all__ = [
    "ArtifactNotFound",
    "AtomicFileSystemArtifactStore",
    "artifact_id",
    "open_store",
    "replace_file",
]


def __getattr__(name: str) -> Any:
    # Optuna's artifact stores are imported on first use: importing them imports boto3 where it
    # is installed, a fifth of a second of every worker's start whether it checkpoints or not.
    value: Any
    if name == "ArtifactNotFound":
        from optuna.artifacts import exceptions

        value = exceptions.ArtifactNotFound
    elif name == "AtomicFileSystemArtifactStore":
        value = _define_atomic_store()
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


@functools.cache  # one class: checkpoint.py's isinstance check must see the store's own
def _define_atomic_store() -> type:
    from optuna.artifacts import FileSystemArtifactStore

    class AtomicFileSystemArtifactStore(FileSystemArtifactStore):
        """Optuna's directory store, with writes that replace an artifact atomically."""

        def write(self, artifact_id: str, content_body: BinaryIO) -> None:
            self.write_with(artifact_id, lambda f: shutil.copyfileobj(content_body, f))

        def write_with(self, artifact_id: str, fill: Callable[[BinaryIO], object]) -> None:
            """Replace the artifact with what ``fill`` writes (a pickle goes straight to disk,
            never whole into memory)."""
            target = self._get_filepath(artifact_id)
            target.parent.mkdir(parents=True, exist_ok=True)
            replace_file(target, fill)

        def remove(self, artifact_id: str) -> None:
            """Remove the artifact and what writers killed mid-save left beside it."""
            target = self._get_filepath(artifact_id)
            for leftover in target.parent.glob(f"{glob.escape(target.name)}.tmp-*"):
                leftover.unlink(missing_ok=True)
            super().remove(artifact_id)

    AtomicFileSystemArtifactStore.__module__ = __name__
    AtomicFileSystemArtifactStore.__qualname__ = "AtomicFileSystemArtifactStore"
    return AtomicFileSystemArtifactStore


def replace_file(target: Path, fill: Callable[[BinaryIO], object]) -> None:
    """Replace ``target`` with what ``fill`` writes into a fresh file beside it, whole or not
    at all: a temporary file (its name unique even among containers sharing a volume, whose
    PIDs are not), fsync, rename."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f"{target.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def where(spec: CheckpointSpec) -> dict[str, str | None]:
    """The part of a ``CheckpointSpec`` a session's process needs to open the same store (a
    relative ``dir`` made absolute here, where the worker started, not where a session chdirs)."""
    folder = None if spec.dir is None else os.path.abspath(spec.dir)
    return {"dir": folder, "s3": spec.s3, "endpoint_url": spec.endpoint_url}


def artifact_id(location: Mapping[str, str | None], study_id: int, point: int) -> str:
    """The checkpoint's name in its store: under the S3 URL's prefix, if any."""
    name = f"study-{study_id}/point-{point}.pkl"
    s3 = location.get("s3")
    if s3:
        prefix = s3.removeprefix("s3://").partition("/")[2].strip("/")
        return f"{prefix}/{name}" if prefix else name
    return name


def open_store(location: Mapping[str, str | None], *, patient: bool = True) -> ArtifactStore:
    """The artifact store ``location`` names (opened once per process). ``patient``: a
    session's save and load ride out a short outage of S3 (8 attempts with backoff); the
    worker's clean-up (``patient=False``) tries twice and moves on. A location this host's
    operator has not allowed is refused here too, whoever asks (``host_policy``)."""
    folder, s3, endpoint = location.get("dir"), location.get("s3"), location.get("endpoint_url")
    refusal = s3_endpoint_refusal(endpoint) or checkpoint_location_refusal(folder, s3)
    if refusal:
        raise PermissionError(f"checkpoints: {refusal}")
    return _open(folder, s3, endpoint, patient)


@functools.lru_cache(maxsize=8)
def _open(
    folder: str | None, s3: str | None, endpoint_url: str | None, patient: bool
) -> ArtifactStore:
    if folder is not None:
        store: ArtifactStore = _define_atomic_store()(Path(os.path.abspath(folder)))
        return store
    assert s3 is not None
    import boto3  # the config check made sure it is there (pip install 'hpo-framework[s3]')
    from botocore.config import Config
    from optuna.artifacts import Boto3ArtifactStore

    bucket = s3.removeprefix("s3://").partition("/")[0]
    # botocore retries what is worth retrying (throttling, 5xx, dropped connections) with
    # backoff; a missing bucket or a refused key is an error at once.
    config = Config(
        retries={"mode": "standard", "max_attempts": 8 if patient else 2},
        connect_timeout=10 if patient else 3, read_timeout=120 if patient else 10,
    )  # fmt: skip
    client = boto3.client("s3", endpoint_url=endpoint_url, config=config)
    # The body handed to write() is a temporary file of checkpoint.save's own: no need for
    # Optuna to copy it into memory first.
    return Boto3ArtifactStore(bucket, client=client, avoid_buf_copy=True)
