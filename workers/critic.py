"""The PPO critic: a value model (the policy's backbone with a one-output token head) and its optimiser."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from orchestrator.core import algos, storage
from orchestrator.core.batch import Batch
from workers.common import configure_threads, disable_dropout, load_model, pick_device, position_ids
from workers.lora import apply_lora
from workers.training import DataParallel, mini_batches

if TYPE_CHECKING:
    from orchestrator.core.spec import LoraSpec, OptimSpec


class Critic(DataParallel):
    def __init__(self, model_path: str, optim: OptimSpec, dtype: str = "float32", trust_remote_code: bool = False,
                 num_gpus: float = 0, threads: int | None = None, shard_rank: int | None = None,
                 lora: LoraSpec | None = None):
        configure_threads(threads)
        torch.manual_seed(optim.seed + 1)
        self.device = pick_device(num_gpus)
        # A causal LM checkpoint loads into *ForTokenClassification with a fresh 1-output head.
        # shard_rank: see PolicyTrainer.
        self.model = disable_dropout(load_model(model_path, "AutoModelForTokenClassification", dtype, trust_remote_code, self.device,
                                                shard_rank=shard_rank, num_labels=1))  # (its head has a dropout before it)
        if lora is not None:  # adapters, and the value head trained whole
            self.model = apply_lora(self.model, lora, task_type="TOKEN_CLS")
        self.lora = lora is not None
        self.optim, self.grad_clip = optim, optim.grad_clip
        self.configure_training(optim.gradient_checkpointing, optim.mixed_precision)
        trained = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trained, lr=optim.critic_lr, weight_decay=optim.weight_decay, foreach=True)

    def _values(self, batch: Batch) -> torch.Tensor:
        out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids(batch.attention_mask))
        # V(s_t) for response token t is read at the position before it, like the log-probs.
        return out.logits[:, batch.prompt_len - 1 : -1, 0].float() * batch.response_mask

    @torch.no_grad()
    def compute_values(self, batch: Batch) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        self.model.eval()
        with self.autocast():
            values = self._values(batch.to(self.device)).cpu()
        return values, time.perf_counter() - start

    def train_step(self, batch: Batch, step: int, num_mini_batches: int, micro_batch_size: int | None) -> dict[str, float]:
        start = time.perf_counter()
        self.model.train()
        losses, clipfracs = [], []
        for mb in mini_batches(batch.to(self.device), num_mini_batches, self.optim.ppo_epochs, self.optim.seed, step, offset=7):
            stats = self.optimizer_step(mb, micro_batch_size, self._loss, self.optim.micro_batch_tokens)
            losses.append(stats["value_loss"])
            clipfracs.append(stats["value_clip_ratio"])
        return {"value_loss": sum(losses) / len(losses), "value_clip_ratio": sum(clipfracs) / len(clipfracs),
                "timing/critic_update_compute": time.perf_counter() - start}

    def _loss(self, micro: Batch, num_tokens: float, num_seqs: float) -> tuple[torch.Tensor, dict[str, float]]:
        loss, clipped = algos.value_loss(self._values(micro), micro.values, micro.returns, micro.response_mask, self.optim.value_clip)
        loss = algos.aggregate_loss(loss, micro.response_mask, "token-mean", num_tokens=num_tokens)
        return loss, {"value_loss": loss.item(), "value_clip_ratio": clipped.sum().item() / max(num_tokens, 1)}

    def save(self, path: str) -> None:
        """Rank 0 writes `critic.pt` (model and optimizer); sharded, every rank writes its shards to `critic_dcp/`."""
        if self.sharded:
            self._save_sharded(path, "critic", hf=False)
            return
        if self.rank == 0:
            with storage.local_dir_for(path) as out:  # a URL: written here, then uploaded
                torch.save({"model": self._trained_state(), "optimizer": self.optimizer.state_dict()}, Path(out) / "critic.pt")

    def load(self, path: str) -> None:
        """What `save` wrote; a sharded checkpoint also onto another number of replicas, sharded or not."""
        if self.sharded or storage.isdir(storage.join(path, "critic_dcp")):
            self._load_sharded(path, "critic")
            return
        state = torch.load(storage.local_copy(storage.join(path, "critic.pt")), weights_only=False)
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        if unexpected or set(missing) & set(self._trained_state()):
            raise RuntimeError(f"{storage.join(path, 'critic.pt')} does not match the critic: missing {missing}, unexpected {unexpected}")
        self.optimizer.load_state_dict(state["optimizer"])

    def _trained_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps: the whole model, or with LoRA the adapters and the value head (the
        frozen base is the model it was loaded from)."""
        trained = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.model.state_dict().items() if k in trained or not self.lora}
