"""Prompt data: JSONL, Parquet or a `datasets.save_to_disk` directory, in TRL's prompt formats.

A row's `prompt` is a string or a list of chat messages; every other column is kept and passed
to reward functions. Errors name the file and the line (JSONL) or row (Parquet / datasets).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and line or row."""


@dataclass(frozen=True)
class PromptDataset:
    prompt_ids: list[list[int]]
    extras: list[dict[str, Any]]  # the row's other columns, plus `prompt_text`
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.prompt_ids)


def read_rows(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a data file as (location, row) pairs; location reads `file:line` or `file row N`."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        return _read_saved_dataset(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for a bad file
            raise DataError(f"{path}: not a readable Parquet file: {err}") from None
        return [(f"{path} row {i}", row) for i, row in enumerate(table.to_pylist())]
    if path.suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    raise DataError(f"{path}: unsupported data format {path.suffix!r}; use .jsonl, .parquet or a save_to_disk directory")


def _read_jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    with path.open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: malformed JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((f"{path}:{lineno}", row))
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


def render_prompt(prompt: Any, tokenizer, where: str) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{where}: prompt is a list of chat messages but the tokenizer has no chat template")
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    raise DataError(f"{where}: 'prompt' must be a string or a list of {{role, content}} messages, got {type(prompt).__name__}")


def load_prompts(path: str | Path, tokenizer, prompt_key: str = "prompt", max_len: int = 128, overlong: str = "truncate_left") -> PromptDataset:
    """Read and tokenize every prompt up front, so a bad row fails the job before any actor starts."""
    ids, extras, dropped = [], [], 0
    for where, row in read_rows(path):
        if prompt_key not in row:
            raise DataError(f"{where}: missing column {prompt_key!r} (columns: {sorted(row)})")
        text = render_prompt(row[prompt_key], tokenizer, where)
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise DataError(f"{where}: empty prompt")
        if len(tokens) > max_len:
            if overlong == "error":
                raise DataError(f"{where}: prompt has {len(tokens)} tokens, more than data.max_prompt_length={max_len}")
            if overlong == "drop":
                dropped += 1
                continue
            tokens = tokens[-max_len:]
        ids.append(tokens)
        extras.append({**{k: v for k, v in row.items() if k != prompt_key}, "prompt_text": text})
    if not ids:
        raise DataError(f"{path}: no usable prompts ({dropped} dropped as longer than {max_len} tokens)")
    return PromptDataset(ids, extras, dropped)


class PromptSampler:
    """Yields the prompt indices of each step: seeded shuffles, epoch after epoch.

    Its whole state is (seed, step), so a resumed job sees exactly the prompts it would have seen.
    """

    def __init__(self, size: int, per_step: int, seed: int, shuffle: bool = True):
        if per_step > size:
            raise DataError(f"optim.prompts_per_step={per_step} is larger than the dataset ({size} prompts)")
        self.size, self.per_step, self.seed, self.shuffle = size, per_step, seed, shuffle
        self.steps_per_epoch = size // per_step  # the incomplete tail of an epoch is skipped

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def indices(self, step: int) -> list[int]:
        """Prompt indices for 0-based `step`."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        return self._order(epoch)[pos * self.per_step : (pos + 1) * self.per_step]
