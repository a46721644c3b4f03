"""Partial rollouts on the HF backend (issue 29): generation in chunks, so that a weight update does
not wait for the longest completion.

Between two chunks the rollout may load new weights; the generations in flight then continue
with them. Each token records the policy version that produced it and the log-prob it was drawn
with, so the trainer can bound staleness by the oldest token (orchestrator/core/staleness.py) and
correct with the behaviour log-probs (`algos.off_policy_correction`). Each chunk is one `generate`
call on prompt + completion so far: its prefill recomputes the KV cache with the current weights
(as AReaL's interruptible generation discards the cache computed by old weights, Fu et al. 2025,
arXiv:2505.24298, sec. 4.1). Rows that finished (EOS or max_new_tokens) leave the batch.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from orchestrator.core.algos import logprobs_from_logits
from orchestrator.core.batch import Batch, build_batch, left_pad, right_pad
from orchestrator.core.seeds import request_seed


class PartialRollout:
    """The in-flight generations of a set of prompts (`n` rows each), advanced one chunk at a time."""

    def __init__(self, prompt_ids: list[list[int]], eos_id: int, pad_id: int, n: int = 1, max_new_tokens: int = 32,
                 greedy: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, step: int = 0):
        self.prompt_ids, self.n = prompt_ids, n
        self.rows = [p for p in prompt_ids for _ in range(n)]  # the n samples of a prompt adjacent, as build_batch wants
        self.eos_id, self.pad_id, self.max_new_tokens = eos_id, pad_id, max_new_tokens
        self.greedy, self.temperature, self.top_p, self.seed, self.step = greedy, temperature, top_p, seed, step
        self.tokens: list[list[int]] = [[] for _ in self.rows]
        self.logprobs: list[list[float]] = [[] for _ in self.rows]
        self.versions: list[list[int]] = [[] for _ in self.rows]
        self.done = [False] * len(self.rows)
        self.chunks = 0

    @property
    def finished(self) -> bool:
        return all(self.done)

    @torch.no_grad()
    def advance(self, model, version: int, chunk_tokens: int, device: torch.device | str = "cpu") -> int:
        """Up to `chunk_tokens` more tokens for every unfinished row, by `model` (policy `version`).
        Returns the tokens generated."""
        active = [i for i, d in enumerate(self.done) if not d]
        if not active:
            return 0
        so_far = len(self.tokens[active[0]])  # every unfinished row has generated as many tokens
        budget = min(chunk_tokens, self.max_new_tokens - so_far)
        ids, mask = left_pad([self.rows[i] + self.tokens[i] for i in active], self.pad_id)
        sampling = dict(do_sample=False) if self.greedy else dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=0)
        # Seeded by (seed, step, chunk) alone, so a chunk draws the same whatever ran before it in this process.
        torch.manual_seed(request_seed(self.seed, self.step, self.chunks))
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=budget,
                             eos_token_id=self.eos_id, pad_token_id=self.pad_id, return_dict_in_generate=True,
                             output_logits=True, **sampling)
        new = out.sequences[:, ids.shape[1]:].cpu()
        logits = torch.stack(out.logits, dim=1).float().cpu()
        # The behaviour log-probs: log softmax(z / T)[token], at the temperature the tokens were drawn with.
        logprobs = logprobs_from_logits(logits / (1.0 if self.greedy else self.temperature), new)
        generated = 0
        for j, i in enumerate(active):
            row = new[j].tolist()
            end = row.index(self.eos_id) + 1 if self.eos_id in row else len(row)
            self.tokens[i] += row[:end]
            self.logprobs[i] += logprobs[j, :end].tolist()
            self.versions[i] += [version] * end
            generated += end
            self.done[i] = self.eos_id in row or len(self.tokens[i]) >= self.max_new_tokens
        self.chunks += 1
        return generated

    def batch(self, extras: list[dict[str, Any]] | None = None) -> tuple[Batch, torch.Tensor]:
        """The finished rollout as the one Batch (behaviour log-probs included) and each response
        token's policy version, (b, R) long, -1 on padding."""
        if not self.finished:
            raise RuntimeError("the rollout is still in flight: advance it until `finished`")
        responses, valid = right_pad(self.tokens, self.pad_id)
        logprobs, _ = right_pad(self.logprobs, 0, dtype=torch.float32)
        versions, _ = right_pad(self.versions, -1)
        batch = build_batch(self.prompt_ids, responses, valid, self.pad_id, self.n, logprobs=logprobs,
                            extras=extras or [{} for _ in self.prompt_ids])
        return batch, versions


def generate_chunked(model, rollout: PartialRollout, chunk_tokens: int, version: Callable[[], int],
                     between_chunks: Callable[[int], None] | None = None, device: torch.device | str = "cpu",
                     max_chunks: int = 100_000) -> PartialRollout:
    """Advance `rollout` to the end, `chunk_tokens` at a time. Before each chunk `between_chunks(chunk
    index)` runs (where a rollout worker loads weights that arrived), then `version()` names the
    weights the chunk is generated with."""
    for chunk in range(max_chunks):
        if rollout.finished:
            return rollout
        if between_chunks is not None:
            between_chunks(chunk)
        rollout.advance(model, version(), chunk_tokens, device)
    raise RuntimeError(f"generation did not finish in {max_chunks} chunks")
