"""Rollout with the vLLM backend: one engine per actor, all `n` samples of a prompt in one request.

Same interface and `Batch` as `HFRollout`. Weight sync keeps the engine running:

- CPU (and any engine whose worker lives in this process): the trainer's state dict arrives
  through Ray's object store (tensors mapped from its shared memory) and is loaded in place by a
  direct `collective_rpc`, with no serialisation. An engine with worker processes gets the
  weights packed into buckets in one `/dev/shm` file that every worker maps.
- GPU: trainer rank 0 and the engines' workers form an NCCL group (vLLM's
  `StatelessProcessGroup` + `PyNcclCommunicator`, outside torch.distributed's global state);
  rank 0 broadcasts the parameters in fixed-size buckets (`NcclWeightSender`). A colocated
  trainer instead hands CUDA IPC handles of its buckets to the engine on the same GPU. The
  trainer's ends and the bucket layout live in workers/weight_transport.py; this module holds the
  engine's ends, inside vLLM's worker (`WeightSyncExtension`).

Every path loads through vLLM's layerwise reload (`initialize_layerwise_reload` ...
`finalize_layerwise_reload`), which re-runs each layer's post-load processing: vLLM's CPU
linear layers keep their weights prepacked in oneDNN handles, so a bare `model.load_weights`
after start-up would leave the kernels computing with the old weights. The prefix cache is
reset after each sync (its KV entries were computed by the old weights).
"""

from __future__ import annotations

import os
import time
import uuid
from typing import TYPE_CHECKING, Any, Iterable

import torch

from orchestrator.core import storage
from orchestrator.core.batch import (
    Batch,
    build_batch,
    response_mask_until_eos,
    right_pad,
)
from orchestrator.core.seeds import request_seed, step_seed
from workers.agent_rollout import AgentSampler
from workers.common import configure_threads, load_tokenizer
from workers.turn_sampler import VLLMTurnSampler
from workers.weight_transport import (
    DEFAULT_BUCKET_BYTES,
    NoRoomForWeights,
    OnNode,
    Region,
    TensorMeta,
    bucket_size,
    from_transport,
    map_file,
    pack_bucket,
    plan_buckets,
    share_parameters,
    unpack_bucket,
    version,
)

if TYPE_CHECKING:
    from orchestrator.core.spec import AgentSpec

EXTENSION = "workers.rollout_vllm.WeightSyncExtension"


# ---------------------------------------------------------------- inside vLLM's worker


def _has_prepacked_weights(model: torch.nn.Module) -> bool:
    """Whether some layer computes from a processed copy of its weight (a prepacked CPU GEMM, a quantised kernel).

    vLLM's CPU GEMMs that prepack capture their handle in a closure; its plain fallback captures nothing.
    """
    for layer in model.modules():
        method = getattr(layer, "quant_method", None)
        if method is not None and not type(method).__name__.startswith("Unquantized"):
            return True
        if getattr(getattr(layer, "cpu_linear", None), "__closure__", None):
            return True
    return False


def use_plain_cpu_gemm() -> None:
    """Make vLLM's CPU linear layers call torch's GEMM on their own weight instead of prepacking it for oneDNN.

    Weights then stay plain tensors that a sync overwrites in place (no re-packing, no new
    memory per sync). For float32 on CPUs without AMX the two GEMMs are close in speed.
    """
    from vllm import _custom_ops

    _custom_ops._supports_onednn = False


if os.environ.get("RLHF_VLLM_PLAIN_CPU_GEMM") == "1":
    use_plain_cpu_gemm()  # in a vLLM worker process, which imports this module before loading the model


class WeightSyncExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); reached through `LLM.collective_rpc`."""

    def _reload(self, batches: Iterable[list[tuple[str, torch.Tensor]]]) -> int:
        """Load (name, tensor) pairs in HF names through vLLM's layerwise reload; returns the count."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )

        model, count = self.model_runner.model, 0
        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            initialize_layerwise_reload(model)
            for named in batches:
                model.load_weights(named)
                count += len(named)
            finalize_layerwise_reload(model, self.vllm_config.model_config)
        return count

    def _load(self, batches: Iterable[list[tuple[str, torch.Tensor]]]) -> int:
        if not _has_prepacked_weights(self.model_runner.model):
            # Every weight is a plain tensor the kernels read: vLLM's loaders copy into it in place.
            count = 0
            with torch.no_grad():
                for named in batches:
                    self.model_runner.model.load_weights(named)
                    count += len(named)
            return count
        return self._reload(batches)

    def rlhf_load(self, named: list[tuple[str, torch.Tensor]]) -> int:
        """In-process path: tensors passed by reference (the worker shares the caller's process)."""
        return self._load([named])

    def rlhf_load_shm(self, path: str, buckets: list[list[TensorMeta]]) -> int:
        """Worker-process path: every bucket lies back to back in one shared-memory file."""
        total = sum(bucket_size(b) for b in buckets)
        flat = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
        device = self.model_runner.device
        views, base = [], 0
        for metas in buckets:
            views.append([(n, t.to(device)) for n, t in unpack_bucket(flat[base : base + bucket_size(metas)], metas)])
            base += bucket_size(metas)
        return self._load(views)

    def rlhf_init_group(self, host: str, port: int, rank_offset: int, world_size: int) -> None:
        """Join the NCCL weight-sync group: trainer rank 0 is rank 0, this worker `rank_offset + tp_rank`."""
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        rank = rank_offset + self.rank
        pg = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
        self._rlhf_comm = PyNcclCommunicator(pg, device=self.device)

    def rlhf_load_nccl(self, buckets: list[list[TensorMeta]]) -> int:
        """Receive each bucket by broadcast from rank 0, loading it while the next one is in flight."""
        comm = self._rlhf_comm

        def received():
            for metas in buckets:
                flat = torch.empty(bucket_size(metas), dtype=torch.uint8, device=self.device)
                comm.broadcast(flat, src=0, stream=torch.cuda.current_stream())
                yield unpack_bucket(flat, metas)

        count = self._load(received())
        torch.cuda.synchronize()
        return count

    def rlhf_load_ipc(self, handles: dict[str, Any], buckets: list[list[TensorMeta]]) -> int:
        """Colocated path: rebuild the trainer's GPU buckets from CUDA IPC handles (no copy across the bus)."""
        uuid_ = torch.cuda.get_device_properties(self.device).uuid
        func, args = handles[str(uuid_)]
        args = list(args)
        args[6] = self.device.index  # the device index as this process numbers it
        flat = func(*args)
        views, base = [], 0
        for metas in buckets:
            views.append(unpack_bucket(flat[base : base + bucket_size(metas)], metas))
            base += bucket_size(metas)
        count = self._load(views)
        torch.cuda.synchronize()
        return count

    def rlhf_share(self, path: str, create: bool) -> tuple[int, dict[str, Region]] | str:
        """Move the parameters into the shared file at `path`; returns (size, regions by vLLM name),
        or why this engine cannot compute from shared memory."""
        model = self.model_runner.model
        if self.model_runner.device.type != "cpu":
            return "the engine is not on the CPU"
        if _has_prepacked_weights(model):
            return "the engine's kernels compute from prepacked copies of the weights"
        try:
            return share_parameters(list(model.named_parameters()), path, create)
        except NoRoomForWeights as e:
            return str(e)

    def rlhf_weights(self) -> dict[str, torch.Tensor]:
        """The weights the engine computes with, by vLLM parameter name, on the CPU (for checks).

        vLLM's CPU linear layers drop their `weight` after prepacking it; for those, the kernel
        itself is applied to an identity matrix, which returns W^T exactly in float32.
        """
        out = {}
        with torch.no_grad():
            for name, p in self.model_runner.model.named_parameters():
                layer = self.model_runner.model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else None
                if name.endswith("weight") and p.numel() == 0 and hasattr(layer, "cpu_linear"):
                    k = layer.input_size_per_partition
                    eye = torch.eye(k, dtype=layer.params_dtype)
                    out[name] = layer.cpu_linear(eye, None, None).t().contiguous().cpu()
                else:
                    out[name] = p.detach().to("cpu", copy=True)
        return out


# ---------------------------------------------------------------- the rollout role


class VLLMRollout(OnNode):
    """Samples `n` completions per prompt with a vLLM engine hosted in this actor."""

    def __init__(self, model_path: str, dtype: str = "float32", trust_remote_code: bool = False, n: int = 4,
                 max_new_tokens: int = 32, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 num_gpus: float = 0, threads: int | None = None, tensor_parallel_size: int = 1,
                 colocate: bool = False, gpu_memory_utilization: float | None = None, max_model_len: int | None = None,
                 plain_cpu_gemm: bool = True, agent: AgentSpec | None = None):
        configure_threads(threads)
        self.on_gpu = num_gpus > 0 and torch.cuda.is_available()
        if not self.on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on the CPU
        if not self.on_gpu and plain_cpu_gemm:
            os.environ["RLHF_VLLM_PLAIN_CPU_GEMM"] = "1"
            use_plain_cpu_gemm()
        if tensor_parallel_size == 1:
            # Engine core and worker in this process: weights load by reference, no copy through a socket.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.n, self.max_new_tokens, self.temperature, self.top_p, self.seed = n, max_new_tokens, temperature, top_p, seed
        # Multi-turn: each sample is an episode of the agent's environment, its turns sampled by this engine.
        self.agent = AgentSampler(self.tokenizer, n, agent, max_new_tokens, temperature, seed) if agent is not None else None
        # Sleep mode (weights and KV cache released around training) exists on CUDA only.
        self.sleeps = colocate and self.on_gpu
        extra = {}
        if self.on_gpu:
            extra["gpu_memory_utilization"] = gpu_memory_utilization or (0.35 if colocate else 0.9)
        local = storage.local_copy(model_path)
        self.llm = LLM(
            model=local,
            tokenizer=local,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            tensor_parallel_size=tensor_parallel_size,
            seed=seed,
            max_model_len=max_model_len,
            enforce_eager=not self.on_gpu,
            enable_prefix_caching=True,
            enable_sleep_mode=self.sleeps,
            # Temperature-scaled log-probs of the sampled token, as the trainer computes them.
            logprobs_mode="processed_logprobs",
            worker_extension_cls=EXTENSION,
            **extra,
        )
        self.in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0" and tensor_parallel_size == 1
        self.asleep: set[str] = set()  # the memory tags released by `sleep`
        self._version: torch.Tensor | None = None  # the shared weights file's write count (see share_weights)
        self.partial = None  # the completions in flight of asynchronous training (`stream`)

    # ------------------------------------------------------------ generation
    def generate(self, prompt_ids: list[list[int]], extras: list[dict[str, Any]], step: int, greedy: bool = False,
                 with_logprobs: bool = True) -> tuple[Batch, float]:
        """Returns the step's Batch (with vLLM's sampling log-probs) and the seconds spent.

        vLLM returns the sampled tokens' log-probs at no cost, so with_logprobs=False changes nothing here.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        start = time.perf_counter()
        if "weights" in self.asleep:
            raise RuntimeError("the colocated engine discarded its weights when it slept: sync weights before generating")
        self.wake_up(["kv_cache"])
        self._drop_stale_cache()
        if self.agent is not None:
            sampler = VLLMTurnSampler(self.llm, self.tokenizer, self.temperature, greedy=greedy, seed=step_seed(self.seed, step))
            batch, _ = self.agent.episodes(sampler, extras, greedy)
            if self.sleeps:
                self.sleep()
            return batch, time.perf_counter() - start
        n = 1 if greedy else self.n
        params = [
            SamplingParams(n=n, max_tokens=self.max_new_tokens, temperature=0.0 if greedy else self.temperature,
                           top_p=1.0 if greedy else self.top_p, logprobs=0, detokenize=False,
                           seed=None if greedy else request_seed(self.seed, step, i))
            for i in range(len(prompt_ids))
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params, use_tqdm=False)
        samples = [c for o in outputs for c in o.outputs]
        batch = self._to_batch(prompt_ids, extras, samples, n)
        if self.sleeps:
            self.sleep()
        return batch, time.perf_counter() - start

    def stream(self, keys: list[int], prompt_ids: list[list[int]], extras: list[dict[str, Any]], version: int,
               chunk_tokens: int) -> tuple[list[tuple[int, Batch, torch.Tensor]], int, float]:
        """Partial rollouts for asynchronous training, as `HFRollout.stream` (orchestrator/stages/async_loop.py
        calls both): the prompts `keys` join those in flight, every unfinished completion advances by up to
        `chunk_tokens` with the weights loaded now (`version` tags the chunk's tokens), and the prompts whose
        `n` completions all finished leave. The engine pauses at a chunk's end: each row is one request that
        stops there, and the next chunk's request resumes from the prefix cache (the KV of prompt and completion
        so far), which `load_weights` resets, so after new weights the engine recomputes it with them."""
        from workers.partial_rollout import PartialRollout, episodes_as_stream

        start = time.perf_counter()
        if "weights" in self.asleep:
            raise RuntimeError("the colocated engine discarded its weights when it slept: sync weights before generating")
        self._drop_stale_cache()
        if self.agent is not None:
            if not keys:
                return [], 0, time.perf_counter() - start
            batch, _ = self.generate(prompt_ids, extras, keys[0])  # (seeded by the call's first key)
            return episodes_as_stream(batch, keys, self.n, version), int(batch.response_mask.sum()), time.perf_counter() - start
        tok = self.tokenizer
        if self.partial is None:
            self.partial = PartialRollout([], tok.eos_token_id, tok.pad_token_id, self.n, self.max_new_tokens,
                                          temperature=self.temperature, top_p=self.top_p, seed=self.seed)
            # One sampler for the run: each call (chunk) seeds its requests anew from (seed, its count, the row).
            self.chunk_sampler = VLLMTurnSampler(self.llm, tok, self.temperature, stop_ids=[tok.eos_token_id], seed=self.seed,
                                                 top_p=self.top_p)
        self.partial.add(prompt_ids, extras, keys)
        tokens = self.partial.advance_with(self.chunk_sampler, version, chunk_tokens)
        return self.partial.take_finished(), tokens, time.perf_counter() - start

    def attach_sandbox(self, actors: list) -> None:
        """The job's sandbox actors, where its environments' code runs (a multi-turn rollout only)."""
        self.agent.attach_sandbox(actors)

    def _to_batch(self, prompt_ids: list[list[int]], extras: list[dict[str, Any]], samples: list, n: int) -> Batch:
        tok = self.tokenizer
        responses, _ = right_pad([list(c.token_ids) for c in samples], tok.pad_token_id)
        # logprobs=0 asks for the sampled token's log-prob only: one entry per position.
        logprobs, _ = right_pad([[pos[t].logprob for pos, t in zip(c.logprobs, c.token_ids)] for c in samples], 0, dtype=torch.float)
        response_mask = response_mask_until_eos(responses, tok.eos_token_id)
        return build_batch(prompt_ids, responses, response_mask, tok.pad_token_id, n, logprobs=logprobs, extras=extras)

    # ------------------------------------------------------------ colocated mode (CUDA only)
    def sleep(self) -> None:
        """Release weights and KV cache while the trainer has the GPU.

        Level 2 discards the weights rather than offloading them: the next sync overwrites them all.
        """
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = {"weights", "kv_cache"}

    def wake_up(self, tags: list[str] | None = None) -> None:
        wanted = set(tags or ("weights", "kv_cache")) & self.asleep
        if not wanted:
            return
        self.llm.wake_up(sorted(wanted))
        self.asleep -= wanted

    # ------------------------------------------------------------ weight sync
    def load_weights(self, state_dict: dict[str, torch.Tensor], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> float:
        """Load the trainer's state dict (HF names) into the running engine; returns the seconds spent."""
        start = time.perf_counter()
        self._wake_weights()
        named = list(from_transport(state_dict).items())
        if self.in_process:
            counts = self.llm.collective_rpc("rlhf_load", args=(named,))
        else:
            counts = self._load_through_shm(named, bucket_bytes)
        self._after_sync(counts, len(named))
        return time.perf_counter() - start

    def _load_through_shm(self, named: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[int]:
        buckets = plan_buckets(named, bucket_bytes)
        total = sum(bucket_size(b) for b in buckets)
        path = f"/dev/shm/rlhf-weights-{uuid.uuid4().hex}"
        try:
            flat = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
            tensors, base = dict(named), 0
            for metas in buckets:
                pack_bucket(metas, tensors, flat[base : base + bucket_size(metas)])
                base += bucket_size(metas)
            return self.llm.collective_rpc("rlhf_load_shm", args=(path, buckets))
        finally:
            self.unlink(path)

    def share_weights(self, path: str, create: bool) -> tuple[int, dict[str, Region]] | str:
        """Make the engine compute from the shared file at `path` (see workers/weight_transport.py);
        returns (size, regions by HF name), or why this engine cannot."""
        if not self.in_process:
            return "the engine's workers run in other processes"
        self._wake_weights()
        shared = self.llm.collective_rpc("rlhf_share", args=(path, create))[0]
        if isinstance(shared, str):
            return shared
        size, regions = shared
        self._version = version(map_file(path, size))
        self._seen = int(self._version)
        return size, hf_regions(regions, self.llm.llm_engine.model_config.hf_config)

    def _drop_stale_cache(self) -> None:
        """With shared weights: the trainer wrote new ones since the last generation, so cached prefixes are stale."""
        if self._version is not None and int(self._version) != self._seen:
            self._seen = int(self._version)
            self.llm.reset_prefix_cache()

    def init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int) -> None:
        """GPU: join trainer rank 0's NCCL group; this engine's workers take ranks rank_offset.. ."""
        self.llm.collective_rpc("rlhf_init_group", args=(host, port, rank_offset, world_size))

    def receive_weights_nccl(self, buckets: list[list[TensorMeta]]) -> float:
        start = time.perf_counter()
        self._wake_weights()
        self._after_sync(self.llm.collective_rpc("rlhf_load_nccl", args=(buckets,)), sum(len(b) for b in buckets))
        return time.perf_counter() - start

    def receive_weights_ipc(self, handles: dict[str, Any], buckets: list[list[TensorMeta]]) -> float:
        start = time.perf_counter()
        self._wake_weights()
        self._after_sync(self.llm.collective_rpc("rlhf_load_ipc", args=(handles, buckets)), sum(len(b) for b in buckets))
        return time.perf_counter() - start

    def _wake_weights(self) -> None:
        self.wake_up(["weights"])  # the KV cache stays released until the next generate

    def _after_sync(self, counts: list[int], expected: int) -> None:
        if any(c != expected for c in counts):
            raise RuntimeError(f"weight sync loaded {counts} tensors per worker, expected {expected}")
        # Cached prefixes hold KV computed by the old weights.
        self.llm.reset_prefix_cache()

    # ------------------------------------------------------------ checks
    def engine_weights(self) -> dict[str, torch.Tensor]:
        """The weights the engine's kernels use, by vLLM name (fused qkv/gate_up), on the CPU."""
        return self.llm.collective_rpc("rlhf_weights")[0]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The engine's weights in the trainer's (HF) names and shapes."""
        return hf_state_dict(self.engine_weights(), self.llm.llm_engine.model_config.hf_config)


def hf_parts(name: str, rows: int, config) -> list[tuple[str, int, int]]:
    """The HF tensors a vLLM parameter holds, as (HF name, first row, end row) along dim 0.

    vLLM fuses q/k/v and gate/up by stacking rows, and pads the vocabulary (to a multiple of 64).
    """
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = getattr(config, "num_key_value_heads", config.num_attention_heads) * head_dim
    if ".qkv_proj." in name:
        return [(name.replace("qkv_proj", "q_proj"), 0, q), (name.replace("qkv_proj", "k_proj"), q, q + kv),
                (name.replace("qkv_proj", "v_proj"), q + kv, q + 2 * kv)]
    if ".gate_up_proj." in name:
        return [(name.replace("gate_up_proj", "gate_proj"), 0, rows // 2), (name.replace("gate_up_proj", "up_proj"), rows // 2, rows)]
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return [(name, 0, config.vocab_size)]
    return [(name, 0, rows)]


def _with_tied_head(out: dict, config) -> dict:
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def hf_state_dict(weights: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """vLLM weights in HF names and shapes: unfused q/k/v and gate/up, the vocabulary unpadded."""
    out = {hf: t[a:b].contiguous() for name, t in weights.items() for hf, a, b in hf_parts(name, t.shape[0], config)}
    return _with_tied_head(out, config)


def hf_regions(regions: dict[str, Region], config) -> dict[str, Region]:
    """Where each HF tensor lies in the shared file, from the regions of vLLM's parameters."""
    out = {hf: r.rows(a, b) for name, r in regions.items() for hf, a, b in hf_parts(name, r.shape[0], config)}
    return _with_tied_head(out, config)
