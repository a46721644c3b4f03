"""API keys: `Authorization: Bearer <key>`; the keys file stores only each key's SHA-256 and its tenant.

    # api_keys.yaml
    keys:
      - tenant: acme
        sha256: 9f86d08188...   # `rlhf keys create --tenant acme` appends these

Keys are random 32-byte tokens, so a plain SHA-256 (not a slow password hash) is the right
choice: it cannot be brute-forced and costs a microsecond per request.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from pathlib import Path

import yaml

# `tml-`: the tinker SDK refuses a key without it, so a key `rlhf keys create` prints works as TINKER_API_KEY
# unchanged. Keys made before (`rlhf-...`) keep working: a key is looked up by its hash, whatever its prefix.
KEY_PREFIX = "tml-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeysFileError(ValueError):
    """The API keys file is missing or malformed; the message names the file and the entry."""


def read_keys_file(path: Path) -> dict[str, str]:
    """{sha256: tenant} from the keys file."""
    if not path.is_file():
        raise KeysFileError(f"API keys file not found: {path} (create one with `rlhf keys create --tenant NAME --file {path}`)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise KeysFileError(f"{path}: invalid YAML: {err}") from None
    entries = raw.get("keys") if isinstance(raw, dict) else None
    if not isinstance(entries, list):
        raise KeysFileError(f"{path}: expected a top-level `keys:` list of {{tenant, sha256}} entries")
    out: dict[str, str] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("tenant"), str) or not isinstance(entry.get("sha256"), str):
            raise KeysFileError(f"{path}: keys[{i}] needs string fields `tenant` and `sha256`")
        digest = entry["sha256"].lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise KeysFileError(f"{path}: keys[{i}].sha256 is not a hex SHA-256 digest")
        out[digest] = entry["tenant"]
    return out


def add_key(path: Path, tenant: str) -> str:
    """Append a new key for `tenant` to the file (created if missing); return the key, shown once."""
    raw = {"keys": []}
    if path.is_file():
        raw = yaml.safe_load(path.read_text()) or {"keys": []}
    key = new_key()
    raw.setdefault("keys", []).append({"tenant": tenant, "sha256": hash_key(key), "created_at": int(time.time())})
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(raw, indent=1) if path.suffix == ".json" else yaml.safe_dump(raw, sort_keys=False))
    os.chmod(tmp, 0o600)
    tmp.replace(path)
    return key


class KeyRing:
    """Maps a presented key to its tenant; re-reads the file when it changes (checked at most every 5 s)."""

    RECHECK_S = 5.0

    def __init__(self, path: Path):
        self.path = Path(path)
        self._mtime = self.path.stat().st_mtime if self.path.exists() else None
        self._tenants = read_keys_file(self.path)
        self._checked = time.monotonic()

    def tenant_for(self, key: str) -> str | None:
        self._maybe_reload()
        return self._tenants.get(hash_key(key))

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.RECHECK_S:
            return
        self._checked = now
        try:
            mtime = self.path.stat().st_mtime
            if mtime != self._mtime:
                self._tenants, self._mtime = read_keys_file(self.path), mtime
        except (OSError, KeysFileError):
            pass  # keep serving the last good keys; a bad edit must not lock every tenant out
