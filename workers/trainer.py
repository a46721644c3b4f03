"""Policy trainer: forward/backward, AdamW, grad clip and gradient accumulation, data parallel
across replicas (workers/training.py). A trainer that also samples, scores against the reference or
runs whole steps is given a part for each (workers/trainer_parts.py)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from orchestrator.core import algos, storage
from orchestrator.core.batch import Batch
from workers.common import (
    configure_threads,
    disable_dropout,
    load_model,
    pick_device,
    response_logprobs,
)
from workers.lora import apply_lora, load_adapter, merged_state_dict, save_adapter
from workers.training import DataParallel, mini_batches
from workers.weight_transport import WeightSource

if TYPE_CHECKING:  # the workers take the spec's typed sections; pydantic is not needed to run them
    from orchestrator.core.spec import LoraSpec, OptimSpec, RolloutSpec


class TrainerPart(Protocol):
    """A phase the trainer runs besides its update (workers/trainer_parts.py)."""

    phase: ClassVar[str]  # the plan's phase: rollout, reference or reward

    def attach(self, trainer: PolicyTrainer) -> None:
        """Load what it needs, in the trainer's process, after the trainer's own model and optimiser."""


class PolicyTrainer(WeightSource, DataParallel):
    """The policy's optimiser steps; its weight-sync methods come from `WeightSource` (workers/weight_transport.py)."""

    def __init__(self, model_path: str, optim: OptimSpec, rollout: RolloutSpec, dtype: str = "float32",
                 trust_remote_code: bool = False, num_gpus: float = 0, threads: int | None = None,
                 lora: LoraSpec | None = None, shard_rank: int | None = None, parts: Sequence[TrainerPart] = ()):
        self.threads = configure_threads(threads)
        torch.manual_seed(optim.seed)
        self.optim, self.rollout = optim, rollout
        self.device = pick_device(num_gpus)
        # shard_rank: this replica's rank in a sharded (fsdp) role: only rank 0 reads the weights (init_distributed shards them).
        self.model = disable_dropout(load_model(model_path, "AutoModelForCausalLM", dtype, trust_remote_code, self.device, shard_rank=shard_rank))
        if lora is not None:
            self.model = apply_lora(self.model, lora)
        self.lora = lora is not None
        self.model.train()
        self.configure_training(optim.gradient_checkpointing, optim.mixed_precision)
        self.grad_clip = optim.grad_clip
        # foreach: one fused update over all tensors instead of a Python loop (13% of a tiny model's step).
        trained = [p for p in self.model.parameters() if p.requires_grad]  # with LoRA, the adapters only
        self.optimizer = torch.optim.AdamW(trained, lr=optim.lr, weight_decay=optim.weight_decay, foreach=True)
        self.parts: dict[str, Any] = {}
        for part in parts:
            part.attach(self)
            self.parts[part.phase] = part

    def _part(self, phase: str) -> Any:
        if phase not in self.parts:
            raise RuntimeError(f"this trainer has no {phase} part: its plan runs the {phase} phase elsewhere")
        return self.parts[phase]

    # ------------------------------------------------------------ the phases its parts run
    def generate(self, prompt_ids: list[list[int]], extras: list[dict], step: int, greedy: bool = False,
                 with_logprobs: bool = True) -> tuple[Batch, float]:
        """The HF rollout's `generate` (workers/rollout.py), from this trainer's weights (its `Sampling` part)."""
        return self._part("rollout").generate(prompt_ids, extras, step, greedy, with_logprobs)

    def compute_logprobs(self, batch: Batch) -> tuple[torch.Tensor, float]:
        """The reference's log-probs (b, R), as the Reference actor gives them (a `KeptReference` or `FrozenBase` part)."""
        return self._part("reference").compute_logprobs(batch)

    def attach_sandbox(self, actors: list) -> None:
        """The job's sandbox actors, where its environments' code runs (a multi-turn rollout only)."""
        self._part("rollout").sampler.attach_sandbox(actors)

    def whole_step(self, prompt_ids: list[list[int]], extras: list[dict], step: int, with_logprobs: bool, num_mini_batches: int,
                   micro_batch_size: int | None, on_policy: bool) -> tuple[Batch, dict[str, Any], dict[str, float]]:
        """Sample, score, advantages, update in one call (its `OneCallStep` part)."""
        return self._part("reward").whole_step(prompt_ids, extras, step, with_logprobs, num_mini_batches, micro_batch_size, on_policy)

    # ------------------------------------------------------------ one step
    def train_step(self, batch: Batch, step: int, num_mini_batches: int, micro_batch_size: int | None, on_policy: bool,
                   publish: bool = False) -> dict[str, float]:
        """PPO-style update over this replica's shard of the step's samples.

        The shard is cut into `num_mini_batches` optimiser steps, each accumulated over micro-batches,
        for `ppo_epochs` passes. With `on_policy` (one optimiser step) the old log-probs are the
        current ones detached, so the ratio is 1 and no old-log-prob pass is needed. With `publish`
        (shared-memory weight sync), rank 0 then writes the new weights where the rollouts read them.
        """
        start = time.perf_counter()
        stats: dict[str, list[float]] = {}
        loss_fn = lambda mb, num_tokens, num_seqs: self._loss(mb, on_policy, num_tokens, num_seqs)  # noqa: E731
        for mb in mini_batches(batch.to(self.device), num_mini_batches, self.optim.ppo_epochs, self.optim.seed, step):
            for k, v in self.optimizer_step(mb, micro_batch_size, loss_fn, self.optim.micro_batch_tokens).items():
                stats.setdefault(k, []).append(v)
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out["timing/update_compute"] = time.perf_counter() - start
        if self.sharded:  # every rank takes part in gathering what the rollouts get
            out.update(self.publish_sharded(publish))
        elif publish and self._shared is not None:
            out["timing/weight_sync"] = self.write_shared_weights()
        return out

    def _loss(self, mb: Batch, on_policy: bool, num_tokens: float, num_seqs: float) -> tuple[torch.Tensor, dict[str, float]]:
        opt, mask = self.optim, mb.response_mask
        logprobs, entropy = response_logprobs(self.model, mb, self.rollout.temperature, with_entropy=True, entropy_grad=bool(opt.entropy_coef))
        old_logprobs = logprobs.detach() if on_policy or mb.logprobs is None else mb.logprobs
        pg, clipped = algos.policy_loss(logprobs, old_logprobs, mb.advantages, mask, opt.clip_eps_low, opt.clip_eps_high, opt.dual_clip)
        is_stats = {}
        tis, off = self.rollout.importance_sampling, self.rollout.off_policy
        if self.rollout.max_staleness and off.enabled and on_policy and mb.logprobs is not None:
            # Async: decoupled PPO (AReaL, arXiv:2505.24298 eq. 5): the ratio is clipped against the update's starting
            # weights (pi_prox, the ratio of 1 above) and each token weighted by pi_prox / pi_behav of the stale weights that drew it.
            weights, _, is_stats = algos.off_policy_correction(old_logprobs, mb.logprobs, mask, off.level, off.tis_cap, off.mask_band)
            pg = pg * weights
        elif tis.enabled and on_policy and mb.logprobs is not None:
            # Off-policy steps already take the rollout log-probs as old_logprobs; this corrects the on-policy ratio of 1.
            weights, sums = algos.truncated_importance_weights(old_logprobs, mb.logprobs, mask, tis.cap)
            pg = pg * weights
            is_stats = {f"rollout_is/{k}": v.item() / max(num_tokens, 1) for k, v in sums.items()}
        # Dr. GRPO divides by a constant, the longest completion allowed, not the longest in the batch.
        agg = dict(mode=opt.loss_agg, num_tokens=num_tokens, num_seqs=num_seqs, norm_len=self.rollout.max_new_tokens)
        loss = algos.aggregate_loss(pg, mask, **agg)
        stats = {"policy_loss": loss.item(), **is_stats}
        if opt.kl_coef > 0 and opt.kl_in == "loss":
            kl = algos.kl_estimate(logprobs, mb.ref_logprobs, opt.kl_estimator)
            kl_loss = algos.aggregate_loss(kl, mask, **agg)
            loss = loss + opt.kl_coef * kl_loss
            stats["kl_loss"] = kl_loss.item()
        # A token mean whatever loss_agg is, as TRL's entropy bonus and `entropy` metric (the mini-batch's tokens).
        ent = algos.aggregate_loss(entropy, mask, "token-mean", num_tokens=num_tokens)
        if opt.entropy_coef:
            loss = loss - opt.entropy_coef * ent
        stats.update(entropy=ent.item(), clip_ratio=(clipped.sum() / max(num_tokens, 1)).item())
        if mb.logprobs is not None:
            stats["approx_kl_behaviour"] = (algos.masked_sum(0.5 * (logprobs.detach() - mb.logprobs) ** 2, mask) / max(num_tokens, 1)).item()
        return loss, stats

    # ------------------------------------------------------------ weights and checkpoints
    def rollout_weights(self) -> dict[str, torch.Tensor]:
        if self.sharded:  # rank 0: gathered after the last update or load; before any, names, shapes and dtypes only
            return self._full if self._full is not None else {
                k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in self.model.state_dict().items()}
        return merged_state_dict(self.model) if self.lora else self.model.state_dict()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.rollout_weights().items()}

    def save(self, path: str) -> None:
        """Rank 0 writes `policy/` (HF layout, loadable by any role) and `policy_optim.pt`; with LoRA,
        `policy/` is the merged model and `policy_adapter/` the adapters a resume continues from."""
        if not self.lora:
            self.save_pretrained(path, "policy")
            return
        if self.rank != 0:
            return
        with storage.local_dir_for(path) as local:
            out = Path(local)
            self.model.get_base_model().save_pretrained(out / "policy", state_dict=merged_state_dict(self.model))
            save_adapter(self.model, out)
            torch.save({"optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, out / "policy_optim.pt")

    def load(self, path: str) -> None:
        if not self.lora:
            self.load_pretrained(path, "policy")
            if self.sharded:  # what the first sync sends
                self.gather_full_weights()
            return
        src = Path(storage.local_copy(path))
        load_adapter(self.model, src)
        state = torch.load(src / "policy_optim.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
