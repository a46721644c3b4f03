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

from orchestrator.core.batch import Batch, build_batch, right_pad
from orchestrator.core.seeds import epoch_seed


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and line or row."""


@dataclass(frozen=True)
class PromptDataset:
    prompt_ids: list[list[int]]
    extras: list[dict[str, Any]]  # the row's other columns, plus `prompt_text`
    dropped: int = 0
    length_limits = "data.max_prompt_length"  # what a dropped row was longer than

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


# ------------------------------------------------------------ SFT data
# Rows are either prompt/completion pairs (`prompt` a string or chat messages, `completion` a
# string or a list of assistant messages) or a chat `messages` list. The loss falls on completion
# tokens only: for chat data, on the assistant turns and nothing else. Every example ends with EOS,
# so the policy learns to stop.


@dataclass(frozen=True)
class SFTDataset:
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    loss_masks: list[list[int]]  # per completion token: 1 where it carries loss
    extras: list[dict[str, Any]]
    dropped: int = 0
    length_limits = "data.max_prompt_length or data.max_completion_length"

    def __len__(self) -> int:
        return len(self.prompt_ids)


def _chat_segments(messages: list[dict], tokenizer, where: str) -> list[tuple[str, int]]:
    """(text, carries loss) pieces of a rendered conversation: each assistant turn is the text its
    chat template adds after the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: chat messages need a tokenizer with a chat template")
    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    segments, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not head.startswith(done) or not full.startswith(head):
            raise DataError(f"{where}: the chat template does not render message {i} as an extension of the ones before it")
        segments += [(head[len(done) :], 0), (full[len(head) :], 1)]
        done = full
    if not any(loss for _, loss in segments):
        raise DataError(f"{where}: no assistant message to train on")
    return segments


def _row_segments(row: dict, data, tokenizer, where: str) -> tuple[str, list[tuple[str, int]]]:
    """(prompt text, completion segments) of one row."""
    if data.messages_key in row:
        segments = _chat_segments(row[data.messages_key], tokenizer, where)
        return segments[0][0], segments[1:]
    for key in (data.prompt_key, data.completion_key):
        if key not in row:
            raise DataError(f"{where}: SFT needs {data.prompt_key!r} and {data.completion_key!r} columns "
                            f"or a {data.messages_key!r} column (columns: {sorted(row)})")
    prompt, completion = row[data.prompt_key], row[data.completion_key]
    if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt-completion
        segments = _chat_segments(prompt + completion, tokenizer, where)
        # Assistant turns inside the prompt are context: they join the prompt and carry no loss.
        head = 2 * sum(m.get("role") == "assistant" for m in prompt) + 1
        return "".join(t for t, _ in segments[:head]), segments[head:]
    if not isinstance(completion, str):
        raise DataError(f"{where}: {data.completion_key!r} must be a string or a list of messages, got {type(completion).__name__}")
    return render_prompt(prompt, tokenizer, where), [(completion, 1)]


def load_sft(path: str | Path, tokenizer, data) -> SFTDataset:
    """Read and tokenize every example up front (`data` is the job's DataSpec)."""
    prompts, completions, masks, extras, dropped = [], [], [], [], 0
    for where, row in read_rows(path):
        prompt, segments = _row_segments(row, data, tokenizer, where)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c_ids, c_mask = [], []
        for text, loss in segments:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            c_ids += ids
            c_mask += [loss] * len(ids)
        c_ids, c_mask = c_ids + [tokenizer.eos_token_id], c_mask + [1]
        if len(p_ids) > data.max_prompt_length or len(c_ids) > data.max_completion_length:
            if data.overlong_prompt == "error":
                raise DataError(f"{where}: example longer than data.max_prompt_length={data.max_prompt_length} "
                                f"or data.max_completion_length={data.max_completion_length} tokens")
            if data.overlong_prompt == "drop":
                dropped += 1
                continue
            p_ids, c_ids, c_mask = p_ids[-data.max_prompt_length :], c_ids[: data.max_completion_length], c_mask[: data.max_completion_length]
        if not p_ids:
            raise DataError(f"{where}: empty prompt")
        prompts.append(p_ids)
        completions.append(c_ids)
        masks.append(c_mask)
        extras.append({k: v for k, v in row.items() if k not in (data.prompt_key, data.completion_key, data.messages_key)})
    if not prompts:
        raise DataError(f"{path}: no usable SFT examples ({dropped} dropped as too long)")
    return SFTDataset(prompts, completions, masks, extras, dropped)


def sft_batch(dataset: SFTDataset, index: list[int], pad_id: int) -> Batch:
    """Examples `index` in the batch layout: left-padded prompt | right-padded completion, with
    `response_mask` = the loss mask."""
    completions, valid = right_pad([dataset.completion_ids[i] for i in index], pad_id)
    loss_mask, _ = right_pad([dataset.loss_masks[i] for i in index], 0, dtype=torch.float)
    return build_batch([dataset.prompt_ids[i] for i in index], completions, valid, pad_id, response_mask=loss_mask,
                       extras=[dataset.extras[i] for i in index])


LOADERS = {
    "prompts": lambda path, tokenizer, data: load_prompts(path, tokenizer, data.prompt_key, data.max_prompt_length, data.overlong_prompt),
    "sft": load_sft,
}


def load_dataset(kind: str, path: str | Path, tokenizer, data) -> PromptDataset | SFTDataset:
    """The rows an algorithm reads (`Algorithm.data`, a key of LOADERS), from the job's DataSpec `data`."""
    return LOADERS[kind](path, tokenizer, data)


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
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        return torch.randperm(self.size, generator=g).tolist()

    def indices(self, step: int) -> list[int]:
        """Prompt indices for 0-based `step`."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        return self._order(epoch)[pos * self.per_step : (pos + 1) * self.per_step]
