"""Data files as rows, with no tensors: JSONL, Parquet or a `datasets.save_to_disk` directory read
row by row, and the structural check an upload gets (POST /v1/files). The control plane stands on
this module alone; `orchestrator.core.data` turns rows into token ids and batches.

Errors name the file and the line (JSONL) or row (Parquet / datasets).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from orchestrator.core import storage


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and line or row."""


def read_rows(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a data file as (location, row) pairs; location reads `file:line` or `file row N`."""
    return list(iter_rows(path))


def iter_rows(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """`read_rows`, one row at a time (a JSONL line or a Parquet batch in memory at once). A URL is read
    from this node's copy, and named as the URL in errors."""
    if storage.is_url(path):
        url, local = str(path), storage.local_copy(path)
        try:
            yield from iter_rows(local)
        except DataError as err:
            raise DataError(str(err).replace(local, url)) from None
        return
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        yield from _read_saved_dataset(path)
    elif path.suffix == ".parquet":
        yield from _iter_parquet(path)
    elif path.suffix in (".jsonl", ".json"):
        yield from _iter_jsonl(path)
    else:
        raise DataError(f"{path}: unsupported data format {path.suffix!r}; use .jsonl, .parquet or a save_to_disk directory")


def _iter_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        i = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{path} row {i}", row
                i += 1
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid and ArrowIOError are among these
        raise DataError(f"{path}: not a readable Parquet file: {err}") from None


def _iter_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8", errors="strict") as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno}: malformed JSON: {err.msg} (column {err.colno})") from None
                except ValueError as err:  # an integer past Python's digit limit (sys.set_int_max_str_digits)
                    raise DataError(f"{path}:{lineno}: unreadable JSON: {err}") from None
                except RecursionError:
                    raise DataError(f"{path}:{lineno}: unreadable JSON: nested too deeply") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                yield f"{path}:{lineno}", row
        except UnicodeDecodeError:
            raise DataError(f"{path}:{lineno + 1}: not UTF-8 text") from None


# What an upload of each purpose (POST /v1/files) must hold, in the default column names: the check
# runs before any model or tokenizer is known, so it reads structure, not tokens.
def _prompt_row(row: dict) -> str | None:
    if "prompt" not in row:
        return f"missing column 'prompt' (columns: {sorted(row)})"
    return _text_or_messages(row["prompt"], "prompt")


def _sft_row(row: dict) -> str | None:
    if "messages" in row:
        return _text_or_messages(row["messages"], "messages", text=False)
    missing = [k for k in ("prompt", "completion") if k not in row]
    if missing:
        return f"SFT rows need 'prompt' and 'completion' columns or a 'messages' column (columns: {sorted(row)})"
    return _text_or_messages(row["prompt"], "prompt") or _text_or_messages(row["completion"], "completion")


def _preference_upload_row(row: dict) -> str | None:
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        return f"preference rows need 'chosen' and 'rejected' columns (and optionally 'prompt'); missing {missing} (columns: {sorted(row)})"
    return (_text_or_messages(row["chosen"], "chosen") or _text_or_messages(row["rejected"], "rejected")
            or (_text_or_messages(row["prompt"], "prompt") if "prompt" in row else None))


def _text_or_messages(value: Any, key: str, text: bool = True) -> str | None:
    if text and isinstance(value, str):
        return None if value else f"empty {key!r}"
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return None
    return f"{key!r} must be {'a string or ' if text else ''}a non-empty list of {{role, content}} messages, got {type(value).__name__}"


UPLOAD_CHECKS = {"train": _prompt_row, "eval": _prompt_row, "sft": _sft_row, "preference": _preference_upload_row}


def check_upload(path: str | Path, purpose: str, name: str | None = None, max_rows: int | None = None) -> int:
    """Read a whole uploaded file, one row at a time, and return its row count; a DataError names the
    first bad line as `<name>:<line>` (the uploaded file's name, not where the server keeps it)."""
    check, rows, path = UPLOAD_CHECKS[purpose], 0, Path(path)
    try:
        for where, row in iter_rows(path):
            problem = check(row)
            if problem:
                raise DataError(f"{where}: {problem}")
            rows += 1
            if max_rows is not None and rows > max_rows:
                raise DataError(f"{path}: more than {max_rows} rows")
    except DataError as err:
        raise DataError(str(err).replace(str(path), name or path.name)) from None
    if rows == 0:
        raise DataError(f"{name or path.name}: no rows")
    return rows


def _read_saved_dataset(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: a directory dataset needs the `datasets` package (pip install datasets)") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"{path}: not a dataset saved with save_to_disk: {err}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict needs a 'train' split, found {list(ds)}")
        ds = ds["train"]
    return [(f"{path} row {i}", row) for i, row in enumerate(ds)]
