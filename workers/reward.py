"""The reward role: built-in functions, import-path functions and reward models, weighted and summed."""

from __future__ import annotations

import importlib
import time
from typing import TYPE_CHECKING, Any, Callable

import torch

from orchestrator.core.algorithms import BUILTIN_REWARDS
from orchestrator.core.batch import Batch
from workers.agent_rollout import episodes_of_rows
from workers.common import (
    configure_threads,
    load_model,
    load_tokenizer,
    pick_device,
    sequence_scores,
)

if TYPE_CHECKING:
    from orchestrator.core.spec import RewardSource


class RewardError(RuntimeError):
    """A reward source that cannot be loaded or that raised; the message names it."""


def resolve_function(name: str) -> Callable[..., list[float]]:
    """A built-in by name (its import path in core/algorithms.py BUILTIN_REWARDS), or `pkg.module:fn`, imported."""
    path = BUILTIN_REWARDS.get(name, name)
    if ":" not in path:
        raise RewardError(f"unknown reward function {name!r}: use one of {sorted(BUILTIN_REWARDS)} or an import path 'pkg.module:fn'")
    module, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise RewardError(f"cannot import reward function {name!r}: {type(err).__name__}: {err}") from None
    if not callable(fn):
        raise RewardError(f"reward function {name!r} is not callable")
    return fn


class RewardModel:
    """A sequence-classification model whose single logit at the last real token is the reward."""

    def __init__(self, path: str, dtype: str, trust_remote_code: bool, device: torch.device):
        self.device = device
        self.tokenizer = load_tokenizer(path, trust_remote_code)
        self.model = load_model(path, "AutoModelForSequenceClassification", dtype, trust_remote_code, device, num_labels=1).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        texts = [p + c for p, c in zip(prompts, completions)]
        self.tokenizer.padding_side = "right"
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        return sequence_scores(self.model, enc["input_ids"], enc["attention_mask"]).cpu().tolist()


class RewardWorker:
    """Scores a Batch: decodes prompts and completions and calls every source.

    A batch of multi-turn episodes (workers/agent_rollout.py `to_batch`) is scored on each episode's
    final assistant text, and its environment's return is one more source, `environment`, of weight 1.

    `sources` are the job spec's reward sources (`JobSpec.reward_sources`), weighted and summed.
    `trust_remote_code` is the tokenizer's (the policy's); each reward model loads with its own
    source's flag alone, unset meaning no remote code: a model's trust is never another's.
    """

    def __init__(self, sources: list[RewardSource], tokenizer_path: str, dtype: str = "float32", trust_remote_code: bool = False,
                 num_gpus: float = 0, threads: int | None = None):
        configure_threads(threads)
        self.tokenizer = load_tokenizer(tokenizer_path, trust_remote_code)
        device = pick_device(num_gpus)
        self.sources = []
        for s in sources:
            fn = resolve_function(s.function) if s.function else RewardModel(s.model, dtype, bool(s.trust_remote_code), device)
            self.sources.append((s.label, fn, s.weight, dict(s.kwargs)))

    def score(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
        """(summed weighted scores (b,), each source's raw scores (b,), seconds spent)."""
        start = time.perf_counter()
        episodes = episodes_of_rows(batch)
        if episodes is None:
            lengths = batch.response_mask.sum(1).long().tolist()
            completions = self.tokenizer.batch_decode([r[:n] for r, n in zip(batch.responses.tolist(), lengths)], skip_special_tokens=True)
        else:
            completions = [e["final"] for e in episodes]
        groups = batch.group_ids.tolist()
        prompts = [batch.extras[g]["prompt_text"] for g in groups]
        columns: dict[str, list[Any]] = {}
        for key in batch.extras[0] if batch.extras else ():
            if key not in ("prompt_text", "episodes"):
                columns[key] = [batch.extras[g].get(key) for g in groups]
        total = torch.zeros(len(batch))
        per_source = {}
        if episodes is not None:
            per_source["environment"] = torch.tensor([float(e["reward"]) for e in episodes])
            total += per_source["environment"]
        for label, fn, weight, kwargs in self.sources:
            try:
                values = fn(prompts, completions, **columns, **kwargs)
            except Exception as err:
                raise RewardError(f"reward function {label!r} raised {type(err).__name__}: {err}") from None
            if len(values) != len(batch):
                raise RewardError(f"reward function {label!r} returned {len(values)} values for {len(batch)} completions")
            scores = torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float32)
            per_source[label] = scores
            total += weight * torch.nan_to_num(scores, nan=0.0)
        return total, per_source, time.perf_counter() - start
