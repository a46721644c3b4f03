"""The frozen reference policy: log-probs of the sampled responses, for the KL penalty."""

from __future__ import annotations

import time

import torch

from orchestrator.core.batch import Batch
from workers.common import batched_logprobs, configure_threads, load_model, pick_device
from workers.training import Sharded


class Reference(Sharded):
    """Replicas each score their shard of the batch; with `strategy: fsdp` they also shard the weights
    (each forward is then a collective: `init_distributed` joins them)."""

    def __init__(self, model_path: str, dtype: str = "float32", trust_remote_code: bool = False, temperature: float = 1.0,
                 micro_batch_size: int | None = None, num_gpus: float = 0, threads: int | None = None,
                 micro_batch_tokens: int | None = None, shard_rank: int | None = None):
        configure_threads(threads)
        self.device = pick_device(num_gpus)
        # shard_rank: this replica's rank in a sharded (fsdp) role: only rank 0 reads the weights (init_distributed shards them).
        self.model = load_model(model_path, "AutoModelForCausalLM", dtype, trust_remote_code, self.device, shard_rank=shard_rank).eval()
        self.model.requires_grad_(False)
        self.temperature, self.micro_batch_size, self.micro_batch_tokens = temperature, micro_batch_size, micro_batch_tokens

    def compute_logprobs(self, batch: Batch) -> tuple[torch.Tensor, float]:
        """(ref log-probs (b, R) on the CPU, seconds spent)."""
        start = time.perf_counter()
        logprobs = batched_logprobs(self.model, batch.to(self.device), self.temperature, self.micro_batch_size,
                                    self.micro_batch_tokens, rounds=self.rounds)
        return (logprobs * batch.response_mask.to(self.device)).cpu(), time.perf_counter() - start
