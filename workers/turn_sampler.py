"""One model turn for a batch of contexts with transformers' `generate`, with the sampling log-probs:
what a multi-turn rollout (workers/agent_rollout.py) and the job's chat endpoint (workers/chat_endpoint.py)
both sample with."""

from __future__ import annotations

import torch

from orchestrator.core.algos import logprobs_from_logits
from orchestrator.core.seeds import request_seed


class HFTurnSampler:
    """One turn for a batch of contexts with transformers' `generate`: (ids, sampling log-probs) per row,
    cut after the first stop token."""

    def __init__(self, model, tokenizer, temperature: float = 1.0, stop_ids: list[int] | None = None, greedy: bool = False):
        self.model, self.tok, self.greedy = model, tokenizer, greedy
        self.temperature = 1.0 if greedy else temperature
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.stop_ids = stop_ids or sorted({tokenizer.eos_token_id, *([end] if isinstance(end, int) and end != tokenizer.unk_token_id else [])})

    @torch.no_grad()
    def __call__(self, contexts: list[list[int]], max_new_tokens: list[int]) -> list[tuple[list[int], list[float]]]:
        width = max(map(len, contexts))
        pad = self.tok.pad_token_id
        device = self.model.device
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in contexts], device=device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts], device=device)
        sampling = {"do_sample": False} if self.greedy else {"do_sample": True, "temperature": self.temperature, "top_p": 1.0, "top_k": 0}
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(max_new_tokens), eos_token_id=self.stop_ids,
                                  pad_token_id=pad, return_dict_in_generate=True, output_logits=True, **sampling)
        gen = out.sequences[:, width:].cpu()
        logprobs = logprobs_from_logits(torch.stack(out.logits, dim=1).float().cpu() / self.temperature, gen)
        rows = []
        for i, limit in enumerate(max_new_tokens):
            row = gen[i, :limit].tolist()
            stops = [j for j, t in enumerate(row) if t in self.stop_ids]
            n = stops[0] + 1 if stops else len(row)
            rows.append((row[:n], logprobs[i, :n].tolist()))
        return rows


class VLLMTurnSampler:
    """One turn for a batch of contexts with a vLLM engine (`vllm.LLM`, the rollout actor's): (ids, sampling
    log-probs) per row, each stopped at its own `max_new_tokens` or after its first stop token, which is kept.
    The log-probs are the engine's processed ones (temperature-scaled, as the trainer recomputes them); each
    context is its own request, seeded by (seed, its index), so the engine batches and caches the prefixes."""

    def __init__(self, llm, tokenizer, temperature: float = 1.0, stop_ids: list[int] | None = None, greedy: bool = False, seed: int = 0,
                 top_p: float = 1.0):
        self.llm, self.greedy, self.seed = llm, greedy, seed
        self.temperature = 1.0 if greedy else temperature
        self.top_p = 1.0 if greedy else top_p
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.stop_ids = stop_ids or sorted({tokenizer.eos_token_id, *([end] if isinstance(end, int) and end != tokenizer.unk_token_id else [])})
        self.calls = 0  # turns sampled so far: each call's requests get seeds of their own

    def __call__(self, contexts: list[list[int]], max_new_tokens: list[int]) -> list[tuple[list[int], list[float]]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.calls += 1
        params = [SamplingParams(n=1, max_tokens=limit, temperature=0.0 if self.greedy else self.temperature, top_p=self.top_p,
                                 stop_token_ids=self.stop_ids, logprobs=0, detokenize=False, skip_special_tokens=False,
                                 seed=None if self.greedy else request_seed(self.seed, self.calls, i))
                  for i, limit in enumerate(max_new_tokens)]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(c)) for c in contexts], params, use_tqdm=False)
        rows = []
        for out in outputs:
            sample = out.outputs[0]
            ids = list(sample.token_ids)
            rows.append((ids, [pos[t].logprob for pos, t in zip(sample.logprobs, ids)]))
        return rows
