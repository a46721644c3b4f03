"""The rollout role: the interface every backend offers (`RolloutBackend`), and the HF backend,
batched `generate` with a KV cache, one call per step."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from orchestrator.core.algos import logprobs_from_logits
from orchestrator.core.batch import (
    Batch,
    build_batch,
    left_pad,
    response_mask_until_eos,
)
from orchestrator.core.seeds import step_seed
from workers.agent_rollout import AgentSampler
from workers.common import (
    configure_threads,
    cpu_state_dict,
    load_model,
    load_tokenizer,
    pick_device,
)
from workers.weight_transport import (
    NoRoomForWeights,
    OnNode,
    Region,
    from_transport,
    share_parameters,
)

if TYPE_CHECKING:
    from orchestrator.core.spec import AgentSpec


@runtime_checkable
class RolloutBackend(Protocol):
    """What the driver calls on a rollout actor, whichever engine it hosts (`HFRollout`, `VLLMRollout`).

    Backends that run on GPUs may add the paths that only GPUs have (the driver calls them only
    when it chose that path, see orchestrator/runtime/weight_sync.py):

    - `init_weight_group(host, port, rank_offset, world_size) -> None`: join trainer rank 0's NCCL
      group, this engine's workers taking ranks `rank_offset` onwards;
    - `receive_weights_nccl(buckets) -> seconds`: take one broadcast sync (buckets: `TensorMeta` lists);
    - `receive_weights_ipc(handles, buckets) -> seconds`: load a colocated trainer's CUDA IPC buffer.
    """

    def generate(self, prompt_ids: list[list[int]], extras: list[dict[str, Any]], step: int, greedy: bool = False,
                 with_logprobs: bool = True) -> tuple[Batch, float]:
        """`n` completions per prompt (1 when greedy) as one Batch, and the seconds spent; sampling is seeded by (seed, step)."""

    def load_weights(self, state_dict: dict[str, Any]) -> float:
        """Load the trainer's state dict (or its `to_transport` form); returns the seconds spent."""

    def share_weights(self, path: str, create: bool) -> tuple[int, dict[str, Region]] | str:
        """Compute from the shared file at `path` from now on; returns (file size, regions by HF name), or why not."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights generation uses, in the trainer's (HF) names, on the CPU."""

    def node_id(self) -> str | None:
        """The Ray node this actor runs on."""


class HFSampler:
    """Sampling with transformers' `generate` from a model it is handed: the HF rollout's own, or, with
    `resources.rollout_in: trainer`, the policy trainer's (workers/trainer.py)."""

    def __init__(self, tokenizer, n: int, max_new_tokens: int, temperature: float, top_p: float, seed: int):
        self.tokenizer = tokenizer
        self.n, self.max_new_tokens, self.temperature, self.top_p, self.seed = n, max_new_tokens, temperature, top_p, seed

    @torch.no_grad()
    def generate(self, model, device: torch.device, prompt_ids: list[list[int]], extras: list[dict[str, Any]], step: int,
                 greedy: bool = False, with_logprobs: bool = True) -> tuple[Batch, float]:
        """Returns the step's Batch (with behaviour log-probs unless with_logprobs=False) and the seconds spent.

        An on-policy update with no KL needs no behaviour log-probs: skipping them saves keeping every
        step's full-vocabulary logits.
        """
        start = time.perf_counter()
        # Sampling is seeded by (seed, step) alone, so a resumed job draws the same samples.
        torch.manual_seed(step_seed(self.seed, step))
        tok = self.tokenizer
        ids, mask = left_pad(prompt_ids, tok.pad_token_id)
        n = 1 if greedy else self.n
        sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=0)
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=self.max_new_tokens,
            num_return_sequences=n,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            return_dict_in_generate=True,
            output_logits=with_logprobs,
            **sampling,
        )
        responses = out.sequences[:, ids.shape[1] :].cpu()
        response_mask = response_mask_until_eos(responses, tok.eos_token_id)
        logprobs = None
        if with_logprobs:
            # Sampling log-probs come free from generate's raw logits: log softmax(z / T)[token].
            logits = torch.stack(out.logits, dim=1).float().cpu()
            logprobs = logprobs_from_logits(logits / (1.0 if greedy else self.temperature), responses)
        batch = build_batch(prompt_ids, responses, response_mask, tok.pad_token_id, n, logprobs=logprobs, extras=extras)
        return batch, time.perf_counter() - start


def make_sampler(tokenizer, n: int, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                 agent: AgentSpec | None = None) -> HFSampler | AgentSampler:
    """The rollout phase's sampler: single completions (`HFSampler`), or with `agent` (the plan's
    `rollout_mode` multi_turn) episodes of its environment (workers/agent_rollout.py `AgentSampler`)."""
    if agent is not None:
        return AgentSampler(tokenizer, n, agent, max_new_tokens, temperature, seed)
    return HFSampler(tokenizer, n, max_new_tokens, temperature, top_p, seed)


class HFRollout(OnNode):
    """Samples `n` completions per prompt with transformers' `generate` (with `agent`: `n` episodes)."""

    def __init__(self, model_path: str, dtype: str = "float32", trust_remote_code: bool = False, n: int = 4,
                 max_new_tokens: int = 32, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 num_gpus: float = 0, threads: int | None = None, agent: AgentSpec | None = None):
        configure_threads(threads)
        self.device = pick_device(num_gpus)
        self.model = load_model(model_path, "AutoModelForCausalLM", dtype, trust_remote_code, self.device).eval()
        self.sampler = make_sampler(load_tokenizer(model_path, trust_remote_code), n, max_new_tokens, temperature, top_p, seed, agent)
        self.partial = None  # the completions in flight of asynchronous training (`stream`)

    def attach_sandbox(self, actors: list) -> None:
        """The job's sandbox actors, where its environments' code runs (a multi-turn rollout only)."""
        self.sampler.attach_sandbox(actors)

    def generate(self, prompt_ids: list[list[int]], extras: list[dict[str, Any]], step: int, greedy: bool = False,
                 with_logprobs: bool = True) -> tuple[Batch, float]:
        return self.sampler.generate(self.model, self.device, prompt_ids, extras, step, greedy, with_logprobs)

    def stream(self, keys: list[int], prompt_ids: list[list[int]], extras: list[dict[str, Any]], version: int,
               chunk_tokens: int) -> tuple[list[tuple[int, Batch, torch.Tensor]], int, float]:
        """Partial rollouts, for asynchronous training (orchestrator/stages/async_loop.py): the prompts
        `keys` join those in flight, every unfinished completion advances one chunk of `chunk_tokens`
        with the weights loaded now (policy `version`, which tags the chunk's tokens), and the prompts
        whose `n` completions have all finished leave. Returns their (key, Batch with behaviour
        log-probs, (n, R) token versions), the tokens generated, and the seconds spent."""
        from workers.partial_rollout import PartialRollout, episodes_as_stream

        start = time.perf_counter()
        s = self.sampler
        if isinstance(s, AgentSampler):
            if not keys:
                return [], 0, time.perf_counter() - start
            batch, _ = s.generate(self.model, self.device, prompt_ids, extras, keys[0])  # (seeded by the call's first key)
            return episodes_as_stream(batch, keys, s.n, version), int(batch.response_mask.sum()), time.perf_counter() - start
        if self.partial is None:
            tok = s.tokenizer
            self.partial = PartialRollout([], tok.eos_token_id, tok.pad_token_id, s.n, s.max_new_tokens, temperature=s.temperature,
                                          top_p=s.top_p, seed=s.seed)
        self.partial.add(prompt_ids, extras, keys)
        tokens = self.partial.advance(self.model, version, chunk_tokens, self.device)
        return self.partial.take_finished(), tokens, time.perf_counter() - start

    def load_weights(self, state_dict: dict[str, Any]) -> float:
        """Copy the trainer's weights in (a state dict, or its `to_transport` form)."""
        start = time.perf_counter()
        self.model.load_state_dict(from_transport(state_dict), strict=True)
        return time.perf_counter() - start

    def share_weights(self, path: str, create: bool) -> tuple[int, dict[str, Region]] | str:
        """Move the parameters into the shared file at `path` (see workers/weight_transport.py); returns
        (size, regions by state-dict name), or why this rollout cannot."""
        if self.device.type != "cpu":
            return "the rollout model is on a GPU"
        params = list(self.model.named_parameters())
        try:
            size, regions = share_parameters(params, path, create)
        except NoRoomForWeights as e:
            return str(e)
        by_storage = {p.data_ptr(): regions[name] for name, p in params}
        return size, {k: by_storage[t.data_ptr()] for k, t in self.model.state_dict().items() if t.data_ptr() in by_storage}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return cpu_state_dict(self.model)
