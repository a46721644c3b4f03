"""The Tinker-compatible API's worker: one base model held once, many tenants' LoRA adapters on it.

`AdapterPool` is a plain class (it runs without Ray): each training run of the Tinker API is a peft
adapter of the one base model, with its own AdamW state; a call names its adapter and the pool makes
it the active one. `FairScheduler` serves the pool's callers one at a time, round-robin across
tenants, so a tenant with many queued calls does not starve another. `start_pool` wraps both as a
named, detached Ray actor (the control plane finds it by name: api/tinker.py).

Sampling runs on transformers' `generate` with the saved adapter made the active one (`hf`), or on one
vLLM engine of the base model with its multi-LoRA support (`vllm`, `VLLMLoraSampler`): each saved
sampler weights is a LoRA adapter the engine loads by path, several tenants' adapters batch in one
engine, and a tenant's LoRA on the unembedding (which vLLM does not serve) samples on `hf`.

The losses are those the Tinker SDK names (`cross_entropy`, `importance_sampling`, `ppo`), as pure
functions of per-token log-probs. Token layout (the SDK's): a datum's `model_input` is the sequence
fed to the model, and position i of `target_tokens`, `weights`, `logprobs`, `advantages` is about
the token predicted at position i.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger("workers.tinker_pool")

# Sampler weights kept loaded as frozen adapters, most recently used; older ones are reloaded from disk when sampled again.
MAX_SAMPLER_ADAPTERS = 8
LORA_ALPHA = 32  # every adapter's (the scale is LORA_ALPHA / rank)
# The SDK's defaults for `ppo` (loss_fn_config clip_low_threshold / clip_high_threshold: bounds of the ratio).
PPO_CLIP = (0.8, 1.2)


def cross_entropy_loss(logprobs: torch.Tensor, inputs: dict[str, torch.Tensor], config: dict) -> torch.Tensor:
    """-sum(weights * logp(target)); logprobs (seq,), weights (seq,) (Tinker: a sum, not a mean)."""
    return -(logprobs * inputs["weights"]).sum()


def importance_sampling_loss(logprobs: torch.Tensor, inputs: dict[str, torch.Tensor], config: dict) -> torch.Tensor:
    """-sum(exp(logp - logq) * A): the REINFORCE estimator corrected for the sampler q (Tinker's IS loss)."""
    ratio = torch.exp(logprobs - inputs["logprobs"])
    return -(ratio * inputs["advantages"]).sum()


def ppo_loss(logprobs: torch.Tensor, inputs: dict[str, torch.Tensor], config: dict) -> torch.Tensor:
    """-sum(min(r A, clip(r, lo, hi) A)), r = exp(logp - logq) (Schulman et al. 2017, eq. 7)."""
    low = float(config.get("clip_low_threshold", PPO_CLIP[0]))
    high = float(config.get("clip_high_threshold", PPO_CLIP[1]))
    ratio = torch.exp(logprobs - inputs["logprobs"])
    adv = inputs["advantages"]
    return -torch.minimum(ratio * adv, ratio.clamp(low, high) * adv).sum()


LOSSES: dict[str, Callable] = {"cross_entropy": cross_entropy_loss, "importance_sampling": importance_sampling_loss, "ppo": ppo_loss}
LOSS_INPUTS = {"cross_entropy": ("target_tokens", "weights"), "importance_sampling": ("target_tokens", "logprobs", "advantages"),
               "ppo": ("target_tokens", "logprobs", "advantages")}


class PoolError(ValueError):
    """A request the pool refuses (unknown loss, missing input, unknown adapter); the message names it."""


class FairScheduler:
    """Runs one call at a time; among waiting callers, tenants take turns (round-robin), each tenant's calls in order."""

    def __init__(self):
        self._cond = threading.Condition()
        self._queues: dict[str, collections.deque] = collections.OrderedDict()
        self._busy = False

    def run(self, tenant: str, fn: Callable, timeout_s: float = 600.0):
        ticket = object()
        with self._cond:
            self._queues.setdefault(tenant, collections.deque()).append(ticket)
            deadline = time.monotonic() + timeout_s
            while self._busy or self._next() is not ticket:
                if not self._cond.wait(timeout=max(0.0, deadline - time.monotonic())) and time.monotonic() >= deadline:
                    self._drop(tenant, ticket)
                    raise TimeoutError(f"waited {timeout_s:.0f} s for a turn on the adapter pool")
            self._queues[tenant].popleft()
            self._busy = True
            # The served tenant goes to the back of the line.
            self._queues.move_to_end(tenant)
            if not self._queues[tenant]:
                del self._queues[tenant]
        try:
            return fn()
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _next(self):
        for queue in self._queues.values():
            if queue:
                return queue[0]
        return None

    def _drop(self, tenant: str, ticket) -> None:
        self._queues[tenant].remove(ticket)
        if not self._queues[tenant]:
            del self._queues[tenant]


class AdapterPool:
    """One base model (loaded once) and a dict of LoRA adapters on it, each with its own optimizer."""

    def __init__(self, base_path: str, threads: int | None = None, sampler: str = "hf", num_gpus: float = 0):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if sampler not in ("hf", "vllm"):
            raise ValueError(f"sampler {sampler!r}: expected hf or vllm")
        if threads:
            torch.set_num_threads(threads)
        self.base_path, self.sampler = base_path, sampler
        self.saved_configs: dict[tuple, dict] = {}  # (sampler weights path, its stamp) -> its LoRA config
        self.tokenizer = AutoTokenizer.from_pretrained(base_path)
        # On the GPU Ray gave the pool's actor (RLHF_API_TINKER_POOL_GPUS), else the CPU; states are saved on the CPU.
        self.device = torch.device("cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu")
        self.engine: VLLMLoraSampler | None = None
        self.engine_error: str | None = None  # why the vllm sampler's engine did not start (each sample call says so)
        if sampler == "vllm":  # first, while the GPU is free: vLLM takes its share of the memory at start
            try:
                self.engine = VLLMLoraSampler(base_path, self.tokenizer, on_gpu=self.device.type == "cuda")
            except Exception as err:  # noqa: BLE001 - the pool still trains; its samples say the engine is missing
                log.exception("the pool's vLLM engine did not start")
                self.engine_error = type(err).__name__
        self.base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).to(self.device)
        self.vocab = self.base.config.vocab_size
        self.model = None  # the PeftModel, made with the first adapter
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.configs: dict[str, dict] = {}
        self.samplers: collections.OrderedDict[str, str] = collections.OrderedDict()  # weights path -> adapter name

    # -- adapters ---------------------------------------------------------------------------------
    def create(self, adapter: str, rank: int, seed: int | None = None, train_attn: bool = True, train_mlp: bool = True,
               train_unembed: bool = False) -> dict:
        from peft import LoraConfig, get_peft_model

        targets = (["q_proj", "k_proj", "v_proj", "o_proj"] if train_attn else []) + (["gate_proj", "up_proj", "down_proj"] if train_mlp else [])
        if train_unembed:
            targets.append("lm_head")
        if not targets:
            raise PoolError("lora_config trains nothing: set one of train_attn, train_mlp, train_unembed")
        config = LoraConfig(r=rank, lora_alpha=LORA_ALPHA, target_modules=targets, lora_dropout=0.0)
        if seed is not None:
            torch.manual_seed(seed)
        if self.model is None:
            self.model = get_peft_model(self.base, config, adapter_name=adapter)
        else:
            self.model.add_adapter(adapter, config)
        self.configs[adapter] = {"rank": rank, "targets": targets}
        self._activate(adapter)
        self.optimizers[adapter] = torch.optim.AdamW(self._params(adapter), lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
        return {"adapter": adapter, "params": sum(p.numel() for p in self._params(adapter))}

    def has(self, adapter: str) -> bool:
        return adapter in self.optimizers

    def drop(self, adapter: str) -> None:
        if adapter in self.optimizers:
            del self.optimizers[adapter], self.configs[adapter]
            self.model.delete_adapter(adapter)

    def _params(self, adapter: str) -> list[torch.nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if f".{adapter}." in n]

    def _activate(self, adapter: str) -> None:
        if self.model is None or adapter not in self.model.peft_config:
            raise PoolError(f"no adapter {adapter} on this pool (it may have been lost with its worker: load its last saved state)")
        self.model.set_adapter(adapter)
        for p in self._params(adapter):
            p.requires_grad_(True)

    # -- training ---------------------------------------------------------------------------------
    def forward_backward(self, adapter: str, data: list[dict], loss_fn: str, config: dict | None = None, backward: bool = True) -> dict:
        """data: [{"tokens": [int], "inputs": {name: list}}]; returns per-datum logprobs, the loss and tokens counted."""
        if loss_fn not in LOSSES:
            raise PoolError(f"loss_fn {loss_fn!r} is not supported here (supported: {', '.join(LOSSES)})")
        for i, datum in enumerate(data):
            self.check_ids(datum["tokens"], f"datum {i}'s tokens")
            if "target_tokens" in datum["inputs"]:
                self.check_ids(datum["inputs"]["target_tokens"], f"datum {i}'s target_tokens")
        self._activate(adapter)
        self.model.train(backward)
        outputs, total, tokens = [], 0.0, 0
        with torch.set_grad_enabled(backward):
            for datum in data:
                inputs = {k: v.to(self.device) for k, v in _loss_inputs(datum["inputs"], loss_fn, len(datum["tokens"])).items()}
                logprobs = self._logprobs(torch.tensor([datum["tokens"]], device=self.device), inputs["target_tokens"].unsqueeze(0))[0]
                loss = LOSSES[loss_fn](logprobs, inputs, config or {})
                if backward:
                    loss.backward()
                total += float(loss.detach())
                tokens += len(datum["tokens"])
                outputs.append(logprobs.detach().float().cpu().numpy())
        return {"logprobs": outputs, "loss": total, "tokens": tokens}

    def _logprobs(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(targets[:, i] | input_ids[:, :i+1]); (b, seq)."""
        logits = self.model(input_ids=input_ids).logits.float()
        return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    def optim_step(self, adapter: str, learning_rate: float, beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-12,
                   weight_decay: float = 0.0, grad_clip_norm: float = 0.0) -> dict:
        self._activate(adapter)
        opt = self.optimizers[adapter]
        for group in opt.param_groups:
            group.update(lr=learning_rate, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
        params = self._params(adapter)
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip_norm if grad_clip_norm > 0 else float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"grad_norm": float(norm)}

    # -- state ------------------------------------------------------------------------------------
    def save_state(self, adapter: str, path: str, optimizer: bool = True) -> str:
        """The adapter's weights (and its optimizer state) under `path`, a directory."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        state = {"config": self.configs[adapter], "weights": {k: v.detach().cpu().clone() for k, v in self._named_params(adapter).items()}}
        if optimizer:
            state["optimizer"] = _to_cpu(self.optimizers[adapter].state_dict())
        torch.save(state, out / "state.pt")
        return str(out)

    def load_state(self, adapter: str, path: str, optimizer: bool) -> None:
        """Load weights (and, with `optimizer`, the optimizer state) saved by save_state; creates the adapter if it is gone."""
        state = self._load_weights(adapter, path)
        opt = self.optimizers[adapter]
        if optimizer and "optimizer" in state:
            opt.load_state_dict(state["optimizer"])
        else:
            opt.state.clear()
        opt.zero_grad(set_to_none=True)

    def _load_weights(self, adapter: str, path: str) -> dict:
        """Copy the weights saved under `path` into `adapter` (created with the saved LoRA config if missing)."""
        state = torch.load(Path(path) / "state.pt", weights_only=True, map_location="cpu")
        if self.has(adapter) and state["config"] != self.configs[adapter]:
            saved, mine = state["config"], self.configs[adapter]
            raise PoolError(f"the checkpoint's LoRA (rank {saved['rank']}, {', '.join(saved['targets'])}) is not this run's "
                            f"(rank {mine['rank']}, {', '.join(mine['targets'])}): load it into a new training run")
        if not self.has(adapter):
            cfg = state["config"]
            self.create(adapter, cfg["rank"], train_attn="q_proj" in cfg["targets"], train_mlp="gate_proj" in cfg["targets"],
                        train_unembed="lm_head" in cfg["targets"])
        params = self._named_params(adapter)
        with torch.no_grad():
            for name, value in state["weights"].items():
                params[name].copy_(value)
        return state

    def _named_params(self, adapter: str) -> dict[str, torch.nn.Parameter]:
        return {n.replace(f".{adapter}.", ".ADAPTER."): p for n, p in self.model.named_parameters() if f".{adapter}." in n}

    # -- sampling ---------------------------------------------------------------------------------
    def sample(self, weights: str | None, prompt: list[int], num_samples: int, max_tokens: int, temperature: float = 1.0,
               top_k: int = -1, top_p: float = 1.0, seed: int | None = None, stop: list[int] | None = None) -> list[dict]:
        """Sample `num_samples` completions with the adapter saved at `weights` (None: the base model), on the pool's
        `sampler`; each: tokens, their log-probs under the sampled model, and why it stopped."""
        self.check_ids(prompt, "the prompt")
        if self.on_engine(weights):
            return self.vllm().sample(weights, self._saved_config(weights) if weights else None, prompt, num_samples, max_tokens,
                                      temperature, top_k, top_p, seed, stop)
        key = None
        if weights is not None:
            key = self._sampler_adapter(weights)
        if seed is not None:
            torch.manual_seed(seed)
        eos = stop if stop is not None else [self.tokenizer.eos_token_id]
        # With no adapter left (each dropped when its session ended), the PeftModel refuses to run (its active adapter's
        # name is stale): the base model, whose LoRA layers then hold nothing, runs as before any run.
        model = self.model if self.model is not None and (key is not None or self.model.peft_config) else self.base
        model.eval()
        ids = torch.tensor([prompt], device=self.device)
        with torch.no_grad(), _adapter_or_base(self.model, key):
            gen = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=temperature > 0, temperature=max(temperature, 1e-5),
                top_k=top_k if top_k > 0 else None, top_p=top_p, max_new_tokens=max_tokens, num_return_sequences=num_samples,
                eos_token_id=eos or None, pad_token_id=self.tokenizer.pad_token_id or 0,
            )
            out = []
            for row in gen[:, len(prompt):].tolist():
                end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
                tokens = row[:end]
                full = torch.tensor([prompt + tokens], device=self.device)
                logprobs = self._logprobs_of(model, full)[0, len(prompt) - 1:] if tokens else torch.zeros(0)
                out.append({"tokens": tokens, "logprobs": logprobs.float().cpu().numpy(), "stop": end < len(row) or (tokens and tokens[-1] in eos)})
        return out

    def check_ids(self, ids, what: str) -> None:
        """A PoolError naming `what` if a token id is outside the base model's vocabulary (on a GPU an embedding lookup
        out of range would poison the device for every tenant; vLLM would refuse a whole batch)."""
        bad = next((int(t) for t in ids if not 0 <= int(t) < self.vocab), None)
        if bad is not None:
            raise PoolError(f"{what}: token id {bad} is outside the base model's vocabulary (0..{self.vocab - 1})")

    def on_engine(self, weights: str | None) -> bool:
        """Whether sampling `weights` runs on the vLLM engine: a vllm pool, and not a LoRA on the unembedding."""
        return self.sampler == "vllm" and (weights is None or "lm_head" not in self._saved_config(weights)["targets"])

    def vllm(self) -> VLLMLoraSampler:
        """The pool's engine (started with the pool), or a PoolError naming why it did not start."""
        if self.engine is None:
            raise PoolError(f"this pool's vLLM engine did not start ({self.engine_error}; the pool's log has why): its operator "
                            "can set RLHF_API_TINKER_SAMPLER=hf")
        return self.engine

    def _saved_config(self, weights: str) -> dict:
        """The LoRA config (rank, targets) of the sampler weights saved at `weights`, read once per path."""
        stamp = (weights, _stamp(weights))
        if stamp not in self.saved_configs:
            if len(self.saved_configs) > 4096:
                self.saved_configs.clear()
            self.saved_configs[stamp] = torch.load(Path(weights) / "state.pt", weights_only=True, map_location="cpu")["config"]
        return self.saved_configs[stamp]

    def _logprobs_of(self, model, full: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=full[:, :-1]).logits.float()
        return torch.log_softmax(logits, dim=-1).gather(-1, full[:, 1:].unsqueeze(-1)).squeeze(-1)

    def _sampler_adapter(self, weights: str) -> str:
        """A frozen adapter made from saved sampler weights, loaded once per path while among the last
        MAX_SAMPLER_ADAPTERS used (an RL loop saves new sampler weights every step)."""
        key = "s" + str(abs(hash((weights, _stamp(weights)))))  # (saved again under the same name: another adapter)
        if self.model is None or key not in self.model.peft_config:
            self._load_weights(key, weights)
            self.optimizers.pop(key)  # frozen: not a training run
            del self.configs[key]
        old = self.samplers.get(weights)
        if old is not None and old != key:
            self.model.delete_adapter(old)
        self.samplers[weights] = key
        self.samplers.move_to_end(weights)
        while len(self.samplers) > MAX_SAMPLER_ADAPTERS:
            _, old = self.samplers.popitem(last=False)
            self.model.delete_adapter(old)
        return key


class VLLMLoraSampler:
    """Sampling on one vLLM engine of the base model with multi-LoRA: the sampler weights saved at a path become a
    LoRA adapter (exported once to PEFT's layout, which vLLM loads), and requests name theirs, so several tenants'
    adapters share the engine's batches; the engine keeps MAX_SAMPLER_ADAPTERS loaded, the most recently used.
    Same answer as `AdapterPool.sample` on HF: tokens, their log-probs under the sampled model (at temperature 1),
    and whether a stop token ended them."""

    MAX_RANK = 64
    GPU_MEMORY = 0.5  # of the pool's GPU: the rest holds transformers' copy, the adapters and their optimizer states
    KEEP_EXPORTS = 4 * MAX_SAMPLER_ADAPTERS  # exported adapters kept on disk (and known to the engine), the most recent

    def __init__(self, base_path: str, tokenizer, on_gpu: bool = False):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process (the pool's actor)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        self.tokenizer = tokenizer
        # vLLM's GPU LoRA kernels take float16 / bfloat16 only: on a GPU the engine samples in bfloat16 (its log-probs
        # then differ from the float32 trainer's by bfloat16's rounding); on the CPU in float32, as the trainer.
        self.llm = LLM(model=base_path, tokenizer=base_path, dtype="bfloat16" if on_gpu else "float32", enable_lora=True,
                       max_loras=MAX_SAMPLER_ADAPTERS, max_lora_rank=self.MAX_RANK, enforce_eager=not on_gpu, enable_prefix_caching=True,
                       **({"gpu_memory_utilization": self.GPU_MEMORY} if on_gpu else {}))
        self.vocab = self.llm.llm_engine.model_config.get_vocab_size()
        self.exports = tempfile.mkdtemp(prefix="rlhf-lora-")
        self.ids: collections.OrderedDict[tuple, int] = collections.OrderedDict()  # (weights path, stamp) -> adapter id, LRU
        self.next_id = 1

    def sample(self, weights: str | None, config: dict | None, prompt: list[int], num_samples: int, max_tokens: int,
               temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0, seed: int | None = None,
               stop: list[int] | None = None) -> list[dict]:
        return self.run([self.prepare(weights, config, prompt, num_samples, max_tokens, temperature, top_k, top_p, seed, stop)])[0]

    def prepare(self, weights: str | None, config: dict | None, prompt: list[int], num_samples: int, max_tokens: int,
                temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0, seed: int | None = None,
                stop: list[int] | None = None) -> tuple:
        """One sample call as the engine's (prompt, sampling params, LoRA request or None); a PoolError if it cannot serve it."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if config is not None and config["rank"] > self.MAX_RANK:
            raise PoolError(f"LoRA rank {config['rank']} is over the {self.MAX_RANK} this pool's engine serves")
        bad = next((t for t in prompt if not 0 <= t < self.vocab), None)
        if bad is not None:
            raise PoolError(f"the prompt: token id {bad} is outside the base model's vocabulary (0..{self.vocab - 1})")
        eos = stop if stop is not None else [self.tokenizer.eos_token_id]
        # As transformers' generate: only `eos` stops (ignore_eos: not also the model's own end token), raw log-probs.
        params = SamplingParams(n=num_samples, max_tokens=max_tokens, temperature=max(temperature, 0.0), top_k=top_k if top_k > 0 else 0,
                                top_p=top_p, seed=seed, stop_token_ids=list(eos), ignore_eos=True, logprobs=0, detokenize=False,
                                skip_special_tokens=False)
        return TokensPrompt(prompt_token_ids=list(prompt)), params, self._lora(weights) if weights is not None else None

    def run(self, requests: list[tuple]) -> list[list[dict]]:
        """Prepared calls, as one `generate` (each with its own adapter): per call, its samples."""
        import numpy as np

        outputs = self.llm.generate([r[0] for r in requests], [r[1] for r in requests], lora_request=[r[2] for r in requests],
                                    use_tqdm=False)
        return [[{"tokens": list(c.token_ids), "logprobs": np.asarray([pos[t].logprob for pos, t in zip(c.logprobs, c.token_ids)], dtype=np.float32),
                  "stop": c.finish_reason == "stop"} for c in out.outputs] for out in outputs]

    def _lora(self, weights: str):
        """The LoRA request of the sampler weights at `weights` as saved now (saved again under the same name: a new
        adapter); the oldest exports past KEEP_EXPORTS leave the disk and the engine."""
        from vllm.lora.request import LoRARequest

        key = (weights, _stamp(weights))
        if key not in self.ids:
            self.ids[key], self.next_id = self.next_id, self.next_id + 1
            export_lora(weights, Path(self.exports) / str(self.ids[key]))
        self.ids.move_to_end(key)
        while len(self.ids) > self.KEEP_EXPORTS:
            _, old = self.ids.popitem(last=False)
            self.llm.llm_engine.remove_lora(old)
            shutil.rmtree(Path(self.exports) / str(old), ignore_errors=True)
        lora_id = self.ids[key]
        return LoRARequest(f"s{lora_id}", lora_id, str(Path(self.exports) / str(lora_id)))


def export_lora(weights: str, out: Path) -> Path:
    """The adapter `AdapterPool.save_state` wrote at `weights` in PEFT's layout (adapter_config.json and
    adapter_model.safetensors, the adapter's name taken out of its tensors' names), which vLLM loads."""
    from safetensors.torch import save_file

    state = torch.load(Path(weights) / "state.pt", weights_only=True, map_location="cpu")
    out.mkdir(parents=True, exist_ok=True)
    cfg = state["config"]
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg["rank"], "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0,
        "target_modules": cfg["targets"], "bias": "none", "fan_in_fan_out": False, "modules_to_save": None}))
    save_file({k.replace(".ADAPTER.", "."): v.contiguous() for k, v in state["weights"].items()}, str(out / "adapter_model.safetensors"))
    return out


def _stamp(weights: str) -> int:
    """When the sampler weights at `weights` were last written (a name saved again is other weights)."""
    return (Path(weights) / "state.pt").stat().st_mtime_ns


def _to_cpu(value):
    """A state dict's tensors on the CPU (an optimizer's state from a GPU loads anywhere)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


class _adapter_or_base:
    """Within: `key`'s adapter active, or (key None) every adapter disabled."""

    def __init__(self, model, key: str | None):
        self.model, self.key, self._ctx = model, key, None

    def __enter__(self):
        if self.model is None:
            return self
        if self.key is None:
            if not self.model.peft_config:
                return self  # every adapter dropped: the LoRA layers add nothing
            self._ctx = self.model.disable_adapter()
            self._ctx.__enter__()
        else:
            self.model.set_adapter(self.key)
        return self

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def _loss_inputs(raw: dict, loss_fn: str, length: int) -> dict[str, torch.Tensor]:
    out = {}
    for name in LOSS_INPUTS[loss_fn]:
        if name not in raw:
            raise PoolError(f"loss_fn {loss_fn!r} needs loss_fn_inputs[{name!r}]")
        value = torch.as_tensor(raw[name], dtype=torch.long if name == "target_tokens" else torch.float32).reshape(-1)
        if value.numel() != length:
            raise PoolError(f"loss_fn_inputs[{name!r}] has {value.numel()} entries for {length} input tokens")
        out[name] = value
    return out


class SampleBatcher:
    """Sample calls for the vLLM engine, batched: one thread takes every call waiting (up to MAX_BATCH, the tenants in
    turn, each tenant's calls in order) and runs them as one `generate`, each request with its own adapter, so tenants'
    calls share the engine's batches instead of waiting for each other. They do not wait for the pool's training calls
    either: those run on transformers' model, the engine holds its own copy of the base weights."""

    MAX_BATCH = 64

    def __init__(self, pool: AdapterPool):
        self.pool = pool
        self._cond = threading.Condition()
        self._waiting: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()
        self._thread: threading.Thread | None = None
        self.batches: collections.deque = collections.deque(maxlen=1000)  # calls per generate, the most recent

    def run(self, tenant: str, args: tuple, kwargs: dict, timeout_s: float = 600.0) -> tuple[list[dict], float]:
        """A sample call (AdapterPool.sample's arguments): its samples and its share of the batch's compute seconds."""
        slot = {"args": args, "kwargs": kwargs, "done": threading.Event()}
        with self._cond:
            self._waiting.setdefault(tenant, collections.deque()).append(slot)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="vllm-sample-batcher", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        if not slot["done"].wait(timeout_s):
            with self._cond:  # not taken into a batch yet: it leaves the queue and never runs (one taken runs to its end)
                queue = self._waiting.get(tenant)
                if queue is not None and any(x is slot for x in queue):
                    self._waiting[tenant] = queue = collections.deque(x for x in queue if x is not slot)
                    if not queue:
                        del self._waiting[tenant]
            if not slot["done"].is_set():  # (one that finished meanwhile is answered)
                raise TimeoutError(f"waited {timeout_s:.0f} s for the pool's engine to sample")
        if "error" in slot:
            raise slot["error"]
        return slot["result"], slot["compute_s"]

    def _take(self) -> list[dict]:
        with self._cond:
            while not self._waiting:
                self._cond.wait()
            batch = []
            while self._waiting and len(batch) < self.MAX_BATCH:
                for tenant in list(self._waiting):
                    queue = self._waiting[tenant]
                    batch.append(queue.popleft())
                    if not queue:
                        del self._waiting[tenant]
                    if len(batch) == self.MAX_BATCH:
                        break
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            try:
                self._serve(batch)
            except BaseException as err:  # noqa: BLE001 - never leave a caller waiting: each call fails with it
                for slot in batch:
                    slot.setdefault("error", err)
                    slot.setdefault("compute_s", 0.0)
                    slot["done"].set()

    def _serve(self, batch: list[dict]) -> None:
        """Prepare each call (its own refusals are its own), run the rest as one generate; a batch that fails runs again
        one call at a time, so that one call's fault is not every tenant's."""
        ready = []
        for slot in batch:
            try:
                weights, prompt, num_samples, *rest = slot["args"]
                config = self.pool._saved_config(weights) if weights else None
                slot["request"] = self.pool.vllm().prepare(weights, config, prompt, num_samples, *rest, **slot["kwargs"])
                ready.append(slot)
            except Exception as err:  # noqa: BLE001 - this call's own refusal (its caller raises it)
                slot["error"] = err
        start = time.monotonic()
        try:
            if ready:
                for slot, result in zip(ready, self.pool.vllm().run([s["request"] for s in ready]), strict=True):
                    slot["result"] = result
                self.batches.append(len(ready))
        except Exception as err:  # noqa: BLE001 - see above
            for slot in ready:
                try:
                    if len(ready) == 1:
                        raise err
                    slot["result"] = self.pool.vllm().run([slot["request"]])[0]
                except Exception as own:  # noqa: BLE001 - this call's
                    slot["error"] = own
        share = (time.monotonic() - start) / max(len(ready), 1)
        for slot in batch:
            slot["compute_s"] = share
            slot["done"].set()


class PoolService:
    """What the Ray actor serves: the pool behind the fair scheduler, with each call's compute seconds."""

    def __init__(self, base_path: str, threads: int | None = None, sampler: str = "hf", num_gpus: float = 0):
        self.pool = AdapterPool(base_path, threads, sampler, num_gpus)
        self.scheduler = FairScheduler()
        self.batcher = SampleBatcher(self.pool)
        self.served: collections.deque = collections.deque(maxlen=10_000)  # (tenant, method) in the order served

    def call(self, tenant: str, method: str, *args, **kwargs) -> dict:
        if method.startswith("_") or not hasattr(AdapterPool, method):
            raise PoolError(f"no pool method {method!r}")

        if method == "sample" and self.pool.on_engine(args[0] if args else kwargs.get("weights")):
            self.served.append((tenant, method))
            result, compute_s = self.batcher.run(tenant, args, kwargs)
            return {"result": result, "compute_s": compute_s}

        def timed():
            self.served.append((tenant, method))
            start = time.monotonic()
            result = getattr(self.pool, method)(*args, **kwargs)
            return {"result": result, "compute_s": time.monotonic() - start}

        return self.scheduler.run(tenant, timed)

    def ping(self) -> str:
        return self.pool.base_path

    def sampling(self) -> dict:
        """What the pool samples with: its `sampler`, and with vllm, the saved adapters its engine has served."""
        engine = self.pool.engine
        return {"sampler": self.pool.sampler, "engine_adapters": len(engine.ids) if engine is not None else 0,
                "largest_batch": max(list(self.batcher.batches), default=0)}

    def served_log(self) -> list[tuple[str, str]]:
        """The last 10,000 calls served, (tenant, method), oldest first: what the fairness test counts."""
        return list(self.served)


def start_pool(name: str, namespace: str, base_path: str, num_cpus: float = 1.0, sampler: str = "hf", num_gpus: float = 0) -> str:
    """Create (or find) the named, detached pool actor for one base model (sampling with `sampler`, on a GPU of its own
    with `num_gpus`); returns its name."""
    import ray

    actor = ray.remote(PoolService).options(
        name=name, namespace=namespace, lifetime="detached", get_if_exists=True, max_concurrency=64, num_cpus=num_cpus, num_gpus=num_gpus,
        max_restarts=-1,
    )
    actor.remote(base_path, threads=max(1, int(num_cpus)), sampler=sampler, num_gpus=num_gpus)
    return name
