"""The artifact store: one root (a local directory or any fsspec URL), one area per tenant.

    <root>/tenants/<tenant>/files/<file-id>.<ext>    uploads (POST /v1/files)
    <root>/tenants/<tenant>/runs/<job-id>/           a job's run directory: metrics, events, checkpoints/

The server chooses every location; a tenant names files and checkpoints by id only. Tenant names
come from the operator's keys file, and are still reduced to a safe directory name here.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from pathlib import Path
from typing import IO

from fsspec.core import url_to_fs

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def tenant_dirname(tenant: str) -> str:
    """A directory name no two tenants share: the readable part, plus a hash when it had to change."""
    safe = _UNSAFE.sub("_", tenant)[:48].lstrip(".") or "_"
    return safe if safe == tenant else f"{safe}-{hashlib.sha256(tenant.encode()).hexdigest()[:12]}"


class ArtifactStore:
    CHUNK = 1 << 20

    def __init__(self, root: str, storage_options: dict | None = None):
        self.fs, path = url_to_fs(root, **(storage_options or {}))
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        if self.local:
            path = str(Path(path).resolve())
            Path(path).mkdir(parents=True, exist_ok=True)
        self.root = path.rstrip("/")
        self.root_url = self.url(self.root)

    def strip(self, url: str) -> str:
        """The store's own path of a URL or path that a job was given."""
        return str(Path(url).resolve()) if self.local else self.fs._strip_protocol(url)

    def url(self, path: str) -> str:
        """What a job is given: a local path, or a URL with the store's protocol."""
        return path if self.local else self.fs.unstrip_protocol(path)

    # --- where things live -----------------------------------------------------------------------

    def tenant_root(self, tenant: str) -> str:
        return f"{self.root}/tenants/{tenant_dirname(tenant)}"

    def file_path(self, tenant: str, file_id: str, ext: str) -> str:
        return f"{self.tenant_root(tenant)}/files/{file_id}{ext}"

    def run_path(self, tenant: str, job_id: str) -> str:
        return f"{self.tenant_root(tenant)}/runs/{job_id}"

    def hide(self, value, tenant: str):
        """`value` (a string, or lists and dicts of them) with the tenant's area written as relative
        paths (`runs/job-.../checkpoints/step_000002`): where the server keeps things is its own."""
        if isinstance(value, str):
            return value.replace(self.url(self.tenant_root(tenant)) + "/", "")
        if isinstance(value, dict):
            return {k: self.hide(v, tenant) for k, v in value.items()}
        if isinstance(value, list):
            return [self.hide(v, tenant) for v in value]
        return value

    # --- reading and writing -------------------------------------------------------------------

    def put_file(self, local: Path, path: str) -> None:
        """Copy a finished local file into the store (a rename when the store is on the same disk)."""
        if self.local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            try:
                Path(local).replace(path)
                return
            except OSError:
                pass  # another filesystem: copy
        self.fs.put_file(str(local), path)

    def open(self, path: str, mode: str = "rb") -> IO[bytes]:
        return self.fs.open(path, mode)

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def isdir(self, path: str) -> bool:
        return self.fs.isdir(path)

    def remove(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def open_inside(self, path: str, root: str) -> IO[bytes]:
        """`path` opened for reading if it is a regular file under `root` (a resolved directory),
        reached through no symbolic link; else an OSError. What a tenant downloads from its area
        must not lead out of it, even through a link put there after a listing."""
        if not self.local:
            return self.fs.open(path, "rb")  # an object store has no links
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # (a FIFO must not block the read)
        try:
            real = os.readlink(f"/proc/self/fd/{fd}") if os.path.isdir("/proc/self/fd") else os.path.realpath(path)
            if not stat.S_ISREG(os.fstat(fd).st_mode) or not real.startswith(root.rstrip("/") + "/"):
                raise FileNotFoundError(errno.ENOENT, "not a regular file inside the directory", path)
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def size_of(self, f) -> int:
        """Bytes of a file opened by `open_inside`."""
        return os.fstat(f.fileno()).st_size if self.local else int(f.size)

    def walk_files(self, path: str) -> list[tuple[str, str, int]]:
        """(full path, path relative to `path`, size) of every regular file under a directory,
        sorted. Symbolic links are left out and never followed, to files or to directories."""
        if self.local:
            return _walk_local(path)
        found = self.fs.find(path, detail=True)
        out = []
        for full, info in sorted(found.items()):
            out.append((full, full[len(path.rstrip("/")) + 1:], int(info.get("size") or 0)))
        return out


def _walk_local(root: str) -> list[tuple[str, str, int]]:
    out = []
    for folder, _, names in os.walk(root, followlinks=False):  # a link to a directory is listed, not entered
        for name in names:
            full = os.path.join(folder, name)
            info = os.lstat(full)
            if stat.S_ISREG(info.st_mode):
                out.append((full, os.path.relpath(full, root), info.st_size))
    return sorted(out)
