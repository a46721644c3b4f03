"""Supervised fine-tuning: completion-only data, its batches, and the SFT stage's driver.

Rows are either prompt/completion pairs (`prompt` a string or chat messages, `completion` a
string or a list of assistant messages) or a chat `messages` list. The loss falls on completion
tokens only: for chat data, on the assistant turns and nothing else. Every example ends with EOS,
so the policy learns to stop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from orchestrator.batch import Batch
from orchestrator.data import DataError, read_rows, render_prompt
from orchestrator.driver import Orchestrator
from workers.sft import SFTTrainer


@dataclass(frozen=True)
class SFTDataset:
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    loss_masks: list[list[int]]  # per completion token: 1 where it carries loss
    extras: list[dict[str, Any]]
    dropped: int = 0

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
    P = max(len(dataset.prompt_ids[i]) for i in index)
    R = max(len(dataset.completion_ids[i]) for i in index)
    ids = torch.full((len(index), P + R), pad_id, dtype=torch.long)
    attention = torch.zeros((len(index), P + R), dtype=torch.long)
    loss_mask = torch.zeros((len(index), R))
    for row, i in enumerate(index):
        p, c = dataset.prompt_ids[i], dataset.completion_ids[i]
        ids[row, P - len(p) : P + len(c)] = torch.tensor(p + c)
        attention[row, P - len(p) : P + len(c)] = 1
        loss_mask[row, : len(c)] = torch.tensor(dataset.loss_masks[i], dtype=torch.float)
    return Batch(input_ids=ids, attention_mask=attention, response_mask=loss_mask, group_ids=torch.arange(len(index)),
                 prompt_len=P, extras=[dataset.extras[i] for i in index])


class SFTOrchestrator(Orchestrator):
    """The SFT stage: the policy trainer alone takes the steps; rollout and reward actors are
    started only to evaluate (greedy generation scored by the job's rewards)."""

    trainer_cls = SFTTrainer

    def __init__(self, spec, dataset: SFTDataset, reporter, job_id: str, eos_token_id: int, pad_token_id: int):
        super().__init__(spec, dataset, reporter, job_id, eos_token_id)
        self.pad_token_id = pad_token_id

    def train_step(self, step: int) -> dict[str, float]:
        start = time.perf_counter()
        batch = sft_batch(self.dataset, self.sampler.indices(step - 1), self.pad_token_id)
        results = ray.get(self._sharded("trainer", "sft_step", batch, step, self.spec.optim.micro_batch_size))
        compute = max(r.pop("timing/update_compute") for r in results)
        stats = results[0]  # every replica holds the all-reduced values
        elapsed = time.perf_counter() - start
        lengths = batch.response_mask.sum(1)
        return {**stats, "lr": self.spec.optim.lr, "response_length/mean": lengths.mean().item(),
                "timing/update_compute": compute, "timing/step": elapsed,
                "throughput/tokens_per_s": float(batch.attention_mask.sum()) / elapsed}

    def sync_weights(self, timing: dict | None = None) -> None:
        if "rollout" in self.groups:  # only present when the stage evaluates
            super().sync_weights(timing)
