"""Paths that may be URLs: a job's data, models and checkpoints live on a local (or shared) disk or
in an object store (`s3://...`, any fsspec protocol), for clusters whose nodes share no disk.

A process that reads a URL takes a node-local copy first (`local_copy`, cached per node and shared
by the actors on it); a checkpoint directory that is a URL is written through fsspec (small files)
or saved locally and uploaded (models). Options of the store (endpoint, keys) come from the
environment as JSON in `RLHF_STORAGE_OPTIONS`, which the control plane sets for its jobs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

CACHE_ENV = "RLHF_CACHE_DIR"
OPTIONS_ENV = "RLHF_STORAGE_OPTIONS"


def is_url(path: str | Path) -> bool:
    """An fsspec URL other than a plain local path (`file://` counts as local)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def storage_options() -> dict[str, Any]:
    return json.loads(os.environ.get(OPTIONS_ENV) or "{}")


def filesystem(path: str):
    """(fsspec filesystem, its path) of a URL or a local path."""
    from fsspec.core import url_to_fs

    return url_to_fs(str(path), **(storage_options() if is_url(path) else {}))


def join(root: str | Path, *parts: str) -> str:
    """`root/part/...` for a URL or a path (pathlib would fold `s3://` into `s3:/`)."""
    return "/".join([str(root).rstrip("/"), *parts])


def exists(path: str | Path) -> bool:
    if not is_url(path):
        return Path(path).exists()
    fs, remote = filesystem(str(path))
    return fs.exists(remote)


def isdir(path: str | Path) -> bool:
    if not is_url(path):
        return Path(path).is_dir()
    fs, remote = filesystem(str(path))
    return fs.isdir(remote)


def local_copy(path: str | Path) -> str:
    """A local path to read `path` from: itself when local; else a copy (file or directory) in this
    node's cache, downloaded once per node (an flock keeps two actors from fetching it together)."""
    if not is_url(path):
        return str(path)
    root = Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "rlhf-cache")
    root.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(str(path).encode()).hexdigest()[:32]
    # Keep the file name's suffix: the data loaders read the format from it.
    dest = root / (name + "-" + str(path).rstrip("/").rsplit("/", 1)[-1])
    if dest.exists():
        return str(dest)
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dest.exists():
            return str(dest)
        fs, remote = filesystem(str(path))
        tmp = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=root))
        try:
            if fs.isdir(remote):
                fs.get(remote.rstrip("/") + "/", str(tmp / "d"), recursive=True)
            else:
                fs.get_file(remote, str(tmp / "d"))
            (tmp / "d").rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


@contextlib.contextmanager
def local_dir_for(path: str) -> Iterator[str]:
    """A local directory to write `path` into: itself when local; else a temporary directory that is
    uploaded to `path` when the block ends without an error."""
    if not is_url(path):
        Path(path).mkdir(parents=True, exist_ok=True)
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="rlhf-upload-") as tmp:
        yield tmp
        upload(tmp, path)


def upload(local: str | Path, path: str) -> None:
    """Copy a local file or directory to `path` (its contents into `path`, for a directory)."""
    fs, remote = filesystem(path)
    local = Path(local)
    if local.is_dir():
        for f in sorted(p for p in local.rglob("*") if p.is_file()):
            fs.put_file(str(f), remote.rstrip("/") + "/" + f.relative_to(local).as_posix())
    else:
        fs.put_file(str(local), remote)
