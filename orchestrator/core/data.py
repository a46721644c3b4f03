"""Training data: JSONL, Parquet or a `datasets.save_to_disk` directory (read as rows by
`orchestrator.core.rows`), in TRL's prompt, prompt-completion (SFT) and preference formats, made
into token ids and batches; one loader per kind in `LOADERS`.

A row's `prompt` is a string or a list of chat messages; every other column is kept and passed
to reward functions. Errors name the file and the line (JSONL) or row (Parquet / datasets).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator.core.batch import Batch, build_batch, right_pad
from orchestrator.core.rows import DataError, read_rows
from orchestrator.core.seeds import epoch_seed


@dataclass(frozen=True)
class PromptDataset:
    prompt_ids: list[list[int]]
    extras: list[dict[str, Any]]  # the row's other columns, plus `prompt_text`
    dropped: int = 0
    length_limits = "data.max_prompt_length"  # what a dropped row was longer than

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def head(self, n: int) -> "PromptDataset":
        return dataclasses.replace(self, prompt_ids=self.prompt_ids[:n], extras=self.extras[:n])


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
    return _prompt_completion(row[data.prompt_key], row[data.completion_key], tokenizer, where, data.completion_key)


def _prompt_completion(prompt: Any, completion: Any, tokenizer, where: str, key: str) -> tuple[str, list[tuple[str, int]]]:
    """(prompt text, completion segments) of a prompt and a completion, as plain text or chat messages;
    `key` names the completion's column in errors."""
    if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt-completion
        segments = _chat_segments(prompt + completion, tokenizer, where)
        # Assistant turns inside the prompt are context: they join the prompt and carry no loss.
        head = 2 * sum(m.get("role") == "assistant" for m in prompt) + 1
        return "".join(t for t, _ in segments[:head]), segments[head:]
    if not isinstance(completion, str):
        raise DataError(f"{where}: {key!r} must be a string or a list of messages, got {type(completion).__name__}")
    return render_prompt(prompt, tokenizer, where), [(completion, 1)]


def _completion_ids(segments: list[tuple[str, int]], tokenizer) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a completion's segments, EOS appended (so the policy learns to stop)."""
    c_ids, c_mask = [], []
    for text, loss in segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        c_ids += ids
        c_mask += [loss] * len(ids)
    return c_ids + [tokenizer.eos_token_id], c_mask + [1]


def _fit(p_ids: list[int], completions: list[tuple[list[int], list[int]]], data, where: str):
    """The example within data.max_prompt_length / data.max_completion_length, by data.overlong_prompt:
    (prompt ids, completions) cut to fit (the prompt keeps its end), or None to drop it."""
    if len(p_ids) <= data.max_prompt_length and all(len(ids) <= data.max_completion_length for ids, _ in completions):
        return p_ids, completions
    if data.overlong_prompt == "error":
        raise DataError(f"{where}: example longer than data.max_prompt_length={data.max_prompt_length} "
                        f"or data.max_completion_length={data.max_completion_length} tokens")
    if data.overlong_prompt == "drop":
        return None
    cut = data.max_completion_length
    return p_ids[-data.max_prompt_length :], [(ids[:cut], mask[:cut]) for ids, mask in completions]


def load_sft(path: str | Path, tokenizer, data) -> SFTDataset:
    """Read and tokenize every example up front (`data` is the job's DataSpec)."""
    prompts, completions, masks, extras, dropped = [], [], [], [], 0
    for where, row in read_rows(path):
        prompt, segments = _row_segments(row, data, tokenizer, where)
        fitted = _fit(tokenizer(prompt, add_special_tokens=False)["input_ids"], [_completion_ids(segments, tokenizer)], data, where)
        if fitted is None:
            dropped += 1
            continue
        p_ids, [(c_ids, c_mask)] = fitted
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


# ------------------------------------------------------------ preference data
# TRL's preference formats: `chosen` and `rejected` completions of one prompt, plain text or chat
# messages, with the prompt explicit (a `prompt` column) or implicit (the shared start of chosen and
# rejected). An optional numeric `margin` column says how much better the chosen one is.


@dataclass(frozen=True)
class PreferenceDataset:
    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]  # each ends with EOS unless cut at data.max_completion_length
    chosen_masks: list[list[int]]  # per completion token: 1 where it counts (assistant turns, EOS)
    rejected_ids: list[list[int]]
    rejected_masks: list[list[int]]
    margins: list[float]
    pad_id: int  # of the tokenizer that wrote the ids
    eos_id: int
    dropped: int = 0
    length_limits = "data.max_prompt_length or data.max_completion_length"

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def head(self, n: int) -> "PreferenceDataset":
        lists = ("prompt_ids", "chosen_ids", "chosen_masks", "rejected_ids", "rejected_masks", "margins")
        return dataclasses.replace(self, **{k: getattr(self, k)[:n] for k in lists})


def _shared_prefix(chosen: Any, rejected: Any, data, where: str) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of an implicit-prompt row, as TRL's `extract_prompt`: the prompt is
    the longest shared start (characters of text, or whole messages of a chat); text backs up one
    character to a space, so that both completions start with it."""
    if not (isinstance(chosen, str) and isinstance(rejected, str) or isinstance(chosen, list) and isinstance(rejected, list)):
        raise DataError(f"{where}: 'chosen' and 'rejected' must both be strings or both lists of chat messages, "
                        f"got {type(chosen).__name__} and {type(rejected).__name__}")
    n, limit = 0, min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str) and n > 0 and chosen[n - 1] == " ":
        n -= 1
    if n == 0:
        raise DataError(f"{where}: no {data.prompt_key!r} column, and 'chosen' and 'rejected' share no start to take as the prompt")
    return chosen[:n], chosen[n:], rejected[n:]


def _preference_row(row: dict, data, tokenizer, where: str) -> tuple[str, list[tuple[str, int]], list[tuple[str, int]], float]:
    """(prompt text, chosen segments, rejected segments, margin) of one row."""
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise DataError(f"{where}: preference rows need 'chosen' and 'rejected' columns (and optionally {data.prompt_key!r}); "
                        f"missing {missing} (columns: {sorted(row)})")
    chosen, rejected = row["chosen"], row["rejected"]
    prompt = row.get(data.prompt_key)
    if prompt is None:
        prompt, chosen, rejected = _shared_prefix(chosen, rejected, data, where)
    for key, completion in (("chosen", chosen), ("rejected", rejected)):
        if not completion:
            raise DataError(f"{where}: empty {key!r} completion" + ("" if data.prompt_key in row else
                            " once the shared start is taken as the prompt: give the prompt explicitly"))
    text, chosen_segments = _prompt_completion(prompt, chosen, tokenizer, where, "chosen")
    _, rejected_segments = _prompt_completion(prompt, rejected, tokenizer, where, "rejected")
    margin = row.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise DataError(f"{where}: 'margin' must be a number, got {margin!r}")
    return text, chosen_segments, rejected_segments, float(margin or 0.0)


def load_preference(path: str | Path, tokenizer, data) -> PreferenceDataset:
    """Read and tokenize every pair up front (`data` is the job's DataSpec); the limits and
    `data.overlong_prompt` apply as for SFT, to both completions of a pair."""
    out: dict[str, list] = {k: [] for k in ("prompt_ids", "chosen_ids", "chosen_masks", "rejected_ids", "rejected_masks", "margins")}
    dropped = 0
    for where, row in read_rows(path):
        prompt, chosen, rejected, margin = _preference_row(row, data, tokenizer, where)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        fitted = _fit(p_ids, [_completion_ids(chosen, tokenizer), _completion_ids(rejected, tokenizer)], data, where)
        if fitted is None:
            dropped += 1
            continue
        p_ids, [(c_ids, c_mask), (r_ids, r_mask)] = fitted
        if not p_ids:
            raise DataError(f"{where}: empty prompt")
        for key, value in zip(out, (p_ids, c_ids, c_mask, r_ids, r_mask, margin)):
            out[key].append(value)
    if not out["prompt_ids"]:
        raise DataError(f"{path}: no usable preference pairs ({dropped} dropped as too long)")
    return PreferenceDataset(**out, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, dropped=dropped)


def preference_batch(dataset: PreferenceDataset, index: list[int], with_eos: bool = True) -> Batch:
    """Pairs `index` in the batch layout, two rows a pair: row 2i chosen, row 2i + 1 rejected, both
    `group_ids` i, [left-padded prompt | right-padded completion], `response_mask` 1 on the
    completion's tokens, `extras[i]["margin"]`. Without EOS, the rows are what a reward model scores
    (workers/reward.py scores decoded text, special tokens skipped)."""
    rows, masks = [], []
    for i in index:
        for ids, mask in ((dataset.chosen_ids[i], dataset.chosen_masks[i]), (dataset.rejected_ids[i], dataset.rejected_masks[i])):
            if not with_eos and len(ids) > 1 and ids[-1] == dataset.eos_id:
                ids, mask = ids[:-1], mask[:-1]
            rows.append(ids)
            masks.append(mask)
    completions, valid = right_pad(rows, dataset.pad_id)
    loss_mask, _ = right_pad(masks, 0, dtype=torch.float)
    return build_batch([dataset.prompt_ids[i] for i in index], completions, valid, dataset.pad_id, n=2, response_mask=loss_mask,
                       extras=[{"margin": dataset.margins[i]} for i in index])


LOADERS = {
    "prompts": lambda path, tokenizer, data: load_prompts(path, tokenizer, data.prompt_key, data.max_prompt_length, data.overlong_prompt),
    "sft": load_sft,
    "preference": load_preference,
}


def load_dataset(kind: str, path: str | Path, tokenizer, data) -> PromptDataset | SFTDataset | PreferenceDataset:
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
