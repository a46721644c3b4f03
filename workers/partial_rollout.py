"""Partial rollouts on the HF backend (issue 29): generation in chunks, so that a weight update does
not wait for the longest completion.

Between two chunks the rollout may load new weights; the generations in flight then continue
with them. Each token records the policy version that produced it and the log-prob it was drawn
with, so the trainer can bound staleness by the oldest token (orchestrator/core/staleness.py) and
correct with the behaviour log-probs (`algos.off_policy_correction`). On the HF backend each chunk
is one `generate` call on prompt + completion so far: its prefill recomputes the KV cache with the
current weights (as AReaL's interruptible generation discards the cache computed by old weights,
Fu et al. 2025, arXiv:2505.24298, sec. 4.1). On vLLM (`advance_with` a turn sampler) each row is a
request that stops at the chunk's end, which is how the engine pauses: the next chunk resumes from
its prefix cache, which a weight load resets (so new weights recompute it too). Rows that finished
(EOS or max_new_tokens) leave the batch.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from orchestrator.core.algos import logprobs_from_logits
from orchestrator.core.batch import Batch, build_batch, left_pad, right_pad
from orchestrator.core.seeds import request_seed


class PartialRollout:
    """The in-flight generations of a set of prompts (`n` rows each), advanced one chunk at a time.
    Prompts may join (`add`) while others are in flight, and leave once all their rows finished
    (`take_finished`): asynchronous training's rollout keeps one of these for its whole run."""

    def __init__(self, prompt_ids: list[list[int]], eos_id: int, pad_id: int, n: int = 1, max_new_tokens: int = 32,
                 greedy: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, step: int = 0):
        self.n, self.eos_id, self.pad_id, self.max_new_tokens = n, eos_id, pad_id, max_new_tokens
        self.greedy, self.temperature, self.top_p, self.seed, self.step = greedy, temperature, top_p, seed, step
        self.prompt_ids: list[list[int]] = []
        self.extras: list[dict[str, Any]] = []
        self.rows: list[list[int]] = []  # the n samples of a prompt adjacent, as build_batch wants
        self.tokens: list[list[int]] = []
        self.logprobs: list[list[float]] = []
        self.versions: list[list[int]] = []
        self.done: list[bool] = []
        self.taken: list[bool] = []  # per prompt: handed out by `take_finished`
        self.chunks = 0
        self.keys: dict[int, int] = {}  # prompt index -> the key `add` was given
        self.add(prompt_ids)

    def add(self, prompt_ids: list[list[int]], extras: list[dict[str, Any]] | None = None, keys: list[int] | None = None) -> list[int]:
        """More prompts to generate `n` completions of; returns their indices. `take_finished` names them by
        `keys` (the async driver's) if given, else by these indices."""
        first = len(self.prompt_ids)
        if keys is not None:
            self.keys.update(zip(range(first, first + len(prompt_ids)), keys, strict=True))
        self.prompt_ids += prompt_ids
        self.extras += extras or [{} for _ in prompt_ids]
        self.taken += [False] * len(prompt_ids)
        for p in prompt_ids:
            for _ in range(self.n):
                self.rows.append(p)
                self.tokens.append([])
                self.logprobs.append([])
                self.versions.append([])
                self.done.append(False)
        return list(range(first, len(self.prompt_ids)))

    @property
    def finished(self) -> bool:
        return all(self.done)

    @torch.no_grad()
    def advance(self, model, version: int, chunk_tokens: int, device: torch.device | str = "cpu") -> int:
        """Up to `chunk_tokens` more tokens for every unfinished row by transformers' `generate` with
        `model` (policy `version`): one call, prompt and completion so far re-read. Returns the tokens generated."""
        active, left = self._chunk(chunk_tokens)
        if not active:
            return 0
        budget = max(left)
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
        return self._record(active, [(new[j].tolist(), logprobs[j].tolist()) for j in range(len(active))], left, version)

    def advance_with(self, sample: Callable[[list[list[int]], list[int]], list[tuple[list[int], list[float]]]], version: int,
                     chunk_tokens: int) -> int:
        """`advance` by a turn sampler (workers/turn_sampler.py: contexts and each one's token budget in, (ids, behaviour
        log-probs) out, cut after the stop token): the vLLM engine's, one request per row, whose prefix cache keeps
        the KV of prompt and completion so far between chunks while the weights stay the same."""
        active, left = self._chunk(chunk_tokens)
        if not active:
            return 0
        return self._record(active, sample([self.rows[i] + self.tokens[i] for i in active], left), left, version)

    def _chunk(self, chunk_tokens: int) -> tuple[list[int], list[int]]:
        """The unfinished rows and each one's budget in this chunk: rows that joined later have generated
        fewer tokens, and each stops at its own max_new_tokens."""
        active = [i for i, d in enumerate(self.done) if not d]
        return active, [min(chunk_tokens, self.max_new_tokens - len(self.tokens[i])) for i in active]

    def _record(self, active: list[int], generated: list[tuple[list[int], list[float]]], left: list[int], version: int) -> int:
        """Append each active row's new tokens (cut at its budget and after EOS), their log-probs and `version`."""
        count = 0
        for i, (ids, logprobs), limit in zip(active, generated, left, strict=True):
            row = ids[:limit]
            end = row.index(self.eos_id) + 1 if self.eos_id in row else len(row)
            self.tokens[i] += row[:end]
            self.logprobs[i] += logprobs[:end]
            self.versions[i] += [version] * end
            count += end
            self.done[i] = self.eos_id in row or len(self.tokens[i]) >= self.max_new_tokens
        self.chunks += 1
        return count

    def batch(self, extras: list[dict[str, Any]] | None = None) -> tuple[Batch, torch.Tensor]:
        """The finished rollout as the one Batch (behaviour log-probs included) and each response
        token's policy version, (b, R) long, -1 on padding."""
        if not self.finished:
            raise RuntimeError("the rollout is still in flight: advance it until `finished`")
        return self._batch(range(len(self.prompt_ids)), extras or self.extras)

    def _batch(self, prompts, extras: list[dict[str, Any]]) -> tuple[Batch, torch.Tensor]:
        rows = [p * self.n + j for p in prompts for j in range(self.n)]
        responses, valid = right_pad([self.tokens[r] for r in rows], self.pad_id)
        logprobs, _ = right_pad([self.logprobs[r] for r in rows], 0, dtype=torch.float32)
        versions, _ = right_pad([self.versions[r] for r in rows], -1)
        batch = build_batch([self.prompt_ids[p] for p in prompts], responses, valid, self.pad_id, self.n, logprobs=logprobs,
                            extras=extras)
        return batch, versions

    def take_finished(self) -> list[tuple[int, Batch, torch.Tensor]]:
        """(prompt key or index, its n samples as a Batch, their (n, R) token versions) for each prompt whose
        rows have all finished since the last call; their rows are then forgotten (kept as empty lists)."""
        out = []
        for p, taken in enumerate(self.taken):
            rows = range(p * self.n, (p + 1) * self.n)
            if taken or not all(self.done[r] for r in rows):
                continue
            batch, versions = self._batch([p], [self.extras[p]])
            out.append((self.keys.pop(p, p), batch, versions))
            self.taken[p] = True
            for r in rows:
                self.tokens[r], self.logprobs[r], self.versions[r] = [], [], []
        return out


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


def episodes_as_stream(batch: Batch, keys: list[int], n: int, version: int) -> list[tuple[int, Batch, torch.Tensor]]:
    """`stream`'s answer for whole agent episodes (each key's `n` rows in `batch`, in `keys`' order): every
    response token tagged `version`, -1 on padding. An episode's turns wait on its environment, so it is not
    cut into chunks: new weights arrive between two calls."""
    valid = batch.attention_mask[:, batch.prompt_len :].bool()
    versions = torch.where(valid, torch.full_like(valid, version, dtype=torch.long), torch.full_like(valid, -1, dtype=torch.long))
    return [(key, batch.select(slice(i * n, (i + 1) * n)), versions[i * n : (i + 1) * n]) for i, key in enumerate(keys)]
