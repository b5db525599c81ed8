"""What this host's operator allows: the allow-lists that values read from the database meet.

A study's config lives in the database, and whoever can write the database can change it. So
every value a worker acts on (an address it would connect to, bytes it would unpickle, a
command it would run) is checked against what the worker's *own* operator allowed, in the
worker's environment, which the database cannot touch:

- ``HPO_S3_ENDPOINTS``: the ``checkpoints.endpoint_url`` values this host may connect to
  (comma separated; none by default, so S3 checkpoints go to AWS's own endpoint only);
- ``HPO_CHECKPOINT_LOCATIONS``: the ``s3://bucket/prefix`` locations this host may send
  checkpoints to (none by default: a bucket is an address like any other), and, if it lists
  directories, the only checkpoint directories (and what lies under them) it uses;
- ``HPO_CHECKPOINT_KEY`` (or a file, ``HPO_CHECKPOINT_KEY_FILE``): the key of the MAC every
  checkpoint carries, checked before a byte of it is unpickled (``checkpoint``);
- ``HPO_HOOK_URLS``: URL prefixes a hook may POST to (none by default);
- ``HPO_TRACKING_URIS``: the MLflow tracking servers (URL prefixes) or stores (exact URIs)
  and the TensorBoard directories (and what lies under them) a tracker may write to (none by
  default);
- ``HPO_ALLOW_HOOK_COMMANDS=1`` and ``HPO_UNSAFE_ALLOW_PICKLE=1``: see ``hooks`` and
  ``algorithms``; ``HPO_SESSION_MODULES``: see ``session``.
"""

from __future__ import annotations

import functools
import os
import secrets
import tempfile
import urllib.parse
from pathlib import Path

S3_ENDPOINTS_ENV = "HPO_S3_ENDPOINTS"
CHECKPOINT_LOCATIONS_ENV = "HPO_CHECKPOINT_LOCATIONS"
CHECKPOINT_KEY_ENV = "HPO_CHECKPOINT_KEY"
CHECKPOINT_KEY_FILE_ENV = "HPO_CHECKPOINT_KEY_FILE"
HOOK_URLS_ENV = "HPO_HOOK_URLS"
TRACKING_URIS_ENV = "HPO_TRACKING_URIS"


def _listed(env: str) -> list[str]:
    return [item.strip() for item in os.environ.get(env, "").split(",") if item.strip()]


def _normal_url(url: str) -> tuple[str, str, str]:
    """(scheme, host[:port], path) of a URL, lower-cased where case does not matter; a URL
    with a user or password part has a netloc no allowed entry matches."""
    parts = urllib.parse.urlsplit(url.strip())
    return parts.scheme.lower(), parts.netloc.lower(), parts.path or "/"


def _url_under(url: str, allowed: str) -> bool:
    """Same scheme and host, and a path under the allowed one's; never a path with dot
    segments (``/a/../b``, also percent-encoded) or an encoded slash, which a server that
    resolves them would take somewhere else than the prefix says."""
    scheme, netloc, path = _normal_url(url)
    a_scheme, a_netloc, a_path = _normal_url(allowed)
    raw = urllib.parse.unquote(path)
    if "%2f" in path.lower() or "\\" in raw or any(s in (".", "..") for s in raw.split("/")):
        return False
    under = path == a_path or path.startswith(a_path.rstrip("/") + "/")
    return (scheme, netloc) == (a_scheme, a_netloc) and under


def _dir_under(folder: str, allowed: str) -> bool:
    where, root = Path(os.path.abspath(folder)), Path(os.path.abspath(allowed))
    return where == root or root in where.parents


def s3_endpoint_refusal(endpoint_url: str | None) -> str | None:
    """Why this host will not connect to ``checkpoints.endpoint_url``, or None if it may."""
    if endpoint_url is None:
        return None
    wanted = _normal_url(endpoint_url)[:2]
    if any(_normal_url(allowed)[:2] == wanted for allowed in _listed(S3_ENDPOINTS_ENV)):
        return None
    return (
        f"endpoint {endpoint_url!r} is not among this host's {S3_ENDPOINTS_ENV} (the config "
        "comes from the database, so the host's operator names the S3 services its workers "
        f"may reach: set {S3_ENDPOINTS_ENV}={endpoint_url})"
    )


def checkpoint_location_refusal(folder: str | None, s3: str | None) -> str | None:
    """Why this host will not use this checkpoint location, or None. An S3 location must lie
    under an ``s3://`` entry of ``HPO_CHECKPOINT_LOCATIONS`` (the workers' credentials would
    otherwise upload every checkpoint to any bucket a database writer names); a directory
    may be any one unless the list names directories (reads are MAC-checked all the same)."""
    allowed = _listed(CHECKPOINT_LOCATIONS_ENV)
    if folder is not None:
        roots = [a for a in allowed if "://" not in a]
        if not roots or any(_dir_under(folder, root) for root in roots):
            return None
        named = folder
    else:
        assert s3 is not None
        target = s3.rstrip("/") + "/"
        if ".." not in target.split("/") and any(
            target.startswith(a.rstrip("/") + "/") for a in allowed if a.startswith("s3://")
        ):
            return None
        named = s3
    return (
        f"{named!r} is outside this host's {CHECKPOINT_LOCATIONS_ENV} "
        f"({', '.join(allowed) or 'none'}); the host's operator adds it there"
    )


def hook_url_refusal(url: str) -> str | None:
    """Why this host will not POST to ``url``, or None: it must start with one of
    ``HPO_HOOK_URLS`` (same scheme and host, the path under the allowed one's)."""
    if any(_url_under(url, allowed) for allowed in _listed(HOOK_URLS_ENV)):
        return None
    listed = ", ".join(_listed(HOOK_URLS_ENV)) or "none"
    return f"{url!r} is not under one of this host's {HOOK_URLS_ENV} ({listed})"


def tracking_refusal(destination: str, directory: bool = False) -> str | None:
    """Why this host will not send trials to a tracker at ``destination``, or None. It must
    match one of ``HPO_TRACKING_URIS``: an MLflow tracking URI over http(s) lies under an
    allowed URL (as for hooks), any other (``sqlite:///…``, ``postgresql://…``) equals an
    entry exactly (its query or path could point elsewhere); a TensorBoard ``directory`` lies
    under an allowed directory (an entry without a scheme)."""
    listed = _listed(TRACKING_URIS_ENV)
    for allowed in listed:
        if directory:
            if not urllib.parse.urlsplit(destination).scheme and "://" not in allowed:
                if _dir_under(destination, allowed):
                    return None
        elif destination.startswith(("http://", "https://")):
            if _url_under(destination, allowed):
                return None
        elif destination == allowed:
            return None
    return (
        f"{destination!r} is not under one of this host's {TRACKING_URIS_ENV} "
        f"({', '.join(listed) or 'none'}); the host's operator adds it there"
    )


def checkpoint_key() -> bytes:
    """The key of checkpoints' MACs: ``HPO_CHECKPOINT_KEY``, else the content of
    ``HPO_CHECKPOINT_KEY_FILE`` (default ``~/.config/hpo/checkpoint-key``), which is created
    with a fresh random key, readable by this user only, when missing. Every worker that
    should read another's checkpoints needs the same key (a shared volume, a secret)."""
    return _key(os.environ.get(CHECKPOINT_KEY_ENV), os.environ.get(CHECKPOINT_KEY_FILE_ENV))


@functools.lru_cache(maxsize=4)
def _key(given: str | None, key_file: str | None) -> bytes:
    if given:
        if len(given) < 16:
            raise OSError(f"{CHECKPOINT_KEY_ENV} holds {len(given)} characters, fewer than 16")
        return given.encode()
    path = Path(key_file) if key_file else Path.home() / ".config" / "hpo" / "checkpoint-key"
    try:
        try:
            return _read_key(path)
        except FileNotFoundError:
            _create_key(path)
        return _read_key(path)
    except OSError as e:
        raise OSError(
            f"cannot use the checkpoint key file {str(path)!r}: {e.strerror or e}; "
            f"set {CHECKPOINT_KEY_ENV} or {CHECKPOINT_KEY_FILE_ENV}"
        ) from None


def _create_key(path: Path) -> None:
    """A fresh random key at ``path``, readable by this user only; when several processes
    create it at once, the first one's key is everybody's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        Path(tmp).unlink(missing_ok=True)


def _read_key(path: Path) -> bytes:
    key = path.read_text().strip()
    if len(key) < 16:
        raise OSError(f"it holds {len(key)} characters, fewer than 16")
    return key.encode()
