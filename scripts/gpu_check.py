"""What runs on one GPU without Ray or vLLM: each role class on CUDA, and the weight round trips.

Run by scripts/gpu_check.sh. Without CUDA it says so and runs the same checks on the CPU.
Prints one table row per check and exits non-zero if any check failed.
"""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from orchestrator.core import algos  # noqa: E402
from orchestrator.entrypoints.tiny_model import init_model  # noqa: E402
from workers.common import response_logprobs  # noqa: E402

CUDA = torch.cuda.is_available()
NUM_GPUS = 1 if CUDA else 0
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14]]
N = 4
LOGPROB_ATOL = 2e-3  # HF generate's logits vs one full forward, float32 (TF32 off)

ROWS: list[tuple[str, str, str, float]] = []
STATE: dict = {}


def configs(**rollout) -> tuple:
    """(OptimSpec, RolloutSpec) for the trainer and critic; without pydantic on the box, namespaces
    with the same fields and defaults (the workers only read attributes)."""
    try:
        from orchestrator.core.spec import OptimSpec, RolloutSpec

        return OptimSpec(lr=1e-3, steps=1), RolloutSpec(**rollout)
    except ImportError:
        from types import SimpleNamespace as NS

        optim = NS(lr=1e-3, critic_lr=1e-3, weight_decay=0.0, ppo_epochs=1, clip_eps_low=0.2, clip_eps_high=0.2,
                   dual_clip=None, kl_coef=0.0, kl_estimator="k3", kl_in="loss", entropy_coef=0.0, loss_agg="token-mean",
                   grad_clip=1.0, gamma=1.0, lam=0.95, value_clip=0.2, seed=42)
        tis = NS(**{"enabled": False, "cap": 2.0, **rollout.get("importance_sampling", {})})
        optim.micro_batch_tokens, optim.gradient_checkpointing, optim.mixed_precision = None, False, "no"
        off = NS(enabled=True, level="token", tis_cap=2.0, mask_band=None)
        return optim, NS(temperature=1.0, max_new_tokens=32, importance_sampling=tis, max_staleness=rollout.get("max_staleness", 0),
                         off_policy=off)


def with_fields(section, **fields):
    """A copy of a spec section (pydantic, or the namespace stand-in) with some fields changed."""
    if hasattr(section, "model_copy"):
        return section.model_copy(update=fields)
    from types import SimpleNamespace as NS

    return NS(**{**vars(section), **fields})


def check(name: str):
    def wrap(fn):
        start = time.perf_counter()
        try:
            detail = fn() or "ok"
            status = "SKIP" if detail.startswith("skipped") else "PASS"
        except Exception as err:  # one failing check must not hide the others
            traceback.print_exc()
            detail, status = f"{type(err).__name__}: {err}"[:70], "FAIL"
        ROWS.append((name, status, detail, time.perf_counter() - start))
        return fn
    return wrap


def main() -> int:
    device = torch.cuda.get_device_name(0) if CUDA else "cpu"
    print(f"torch {torch.__version__}, " + (f"CUDA {torch.version.cuda} on {device}" if CUDA else "no CUDA: running the checks on the CPU"))
    torch.backends.cuda.matmul.allow_tf32 = False
    tmp = tempfile.mkdtemp(prefix="gpu_check-")
    model_dir = str(init_model(Path(tmp) / "tiny"))

    @check("HFRollout.generate")
    def _():
        from workers.rollout import HFRollout

        STATE["rollout"] = r = HFRollout(model_dir, n=N, max_new_tokens=8, seed=0, num_gpus=NUM_GPUS)
        batch, _ = r.generate(PROMPTS, [{} for _ in PROMPTS], step=1)
        assert batch.input_ids.shape[0] == len(PROMPTS) * N and torch.isfinite(batch.logprobs).all()
        g = torch.Generator().manual_seed(0)
        scores = torch.rand(len(batch), generator=g)
        STATE["batch"] = batch.replace(scores=scores, advantages=algos.grpo_advantages(scores, batch.group_ids, batch.response_mask))
        return f"{batch.input_ids.shape[0]} samples on {r.device}"

    @check("Reference.compute_logprobs")
    def _():
        from workers.reference import Reference

        ref = Reference(model_dir, num_gpus=NUM_GPUS)
        logprobs, _ = ref.compute_logprobs(STATE["batch"])
        gap = ((logprobs - STATE["batch"].logprobs).abs() * STATE["batch"].response_mask).max().item()
        assert gap < LOGPROB_ATOL, f"reference vs rollout log-probs differ by {gap:.1e}"
        STATE["batch"] = STATE["batch"].replace(ref_logprobs=logprobs)
        return f"max |ref - rollout| = {gap:.1e} on {ref.device}"

    @check("PolicyTrainer.train_step")
    def _():
        from workers.trainer import PolicyTrainer

        optim, rollout = configs(importance_sampling={"enabled": True, "cap": 2.0})
        STATE["trainer"] = t = PolicyTrainer(model_dir, optim, rollout, num_gpus=NUM_GPUS)
        before = {k: v.clone() for k, v in t.state_dict().items()}
        stats = t.train_step(STATE["batch"], 1, 1, 8, True)
        after = t.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in after), "parameters did not change"
        assert all(torch.isfinite(torch.tensor(v)) for v in stats.values()), stats
        return f"loss {stats['policy_loss']:.3f}, IS ratio {stats['rollout_is/ratio']:.4f} on {t.device}"

    @check("grad accumulation = full batch")
    def _():
        from workers.trainer import PolicyTrainer

        optim, rollout = configs()
        optim = optim.model_copy(update={"grad_clip": None}) if hasattr(optim, "model_copy") else optim
        batch = STATE["batch"]
        adv = torch.linspace(-1, 1, len(batch))[:, None] * batch.response_mask
        b = batch.replace(advantages=adv)
        full, accum = (PolicyTrainer(model_dir, optim, rollout, num_gpus=NUM_GPUS) for _ in range(2))
        s_full = full.train_step(b, 1, 1, None, True)
        s_acc = accum.train_step(b, 1, 1, 4, True)  # 16 samples in 4 micro-batches (workers/training.py)
        gap = max((p.grad - q.grad).abs().max().item() for p, q in zip(full.model.parameters(), accum.model.parameters()))
        assert abs(s_full["policy_loss"] - s_acc["policy_loss"]) < 1e-5 and gap < 1e-5, (s_full, s_acc, gap)
        return f"max |grad gap| {gap:.1e} on {full.device}"

    @check("bfloat16 log-probs vs float32")
    def _():
        from workers.common import load_model

        if not CUDA:
            return "skipped: bfloat16 on CUDA only"
        batch = STATE["batch"].to("cuda")
        with torch.no_grad():
            lp32, _ = response_logprobs(load_model(model_dir, dtype="float32", device="cuda"), batch, 1.0)
            lp16, _ = response_logprobs(load_model(model_dir, dtype="bfloat16", device="cuda"), batch, 1.0)
        gap = ((lp16.float() - lp32).abs() * batch.response_mask).max().item()
        assert gap < 0.1, f"bf16 log-probs differ by {gap:.3f}"
        return f"max gap {gap:.1e} (bf16 weights and compute)"

    @check("bf16 autocast, fp32 master weights")
    def _():
        from workers.trainer import PolicyTrainer

        optim, rollout = configs()
        t = PolicyTrainer(model_dir, with_fields(optim, mixed_precision="bf16", gradient_checkpointing=True), rollout, num_gpus=NUM_GPUS)
        batch = STATE["batch"].to(t.device)
        with torch.no_grad():
            lp32, _ = response_logprobs(t.model, batch, 1.0)
            with t.autocast():
                lp16, _ = response_logprobs(t.model, batch, 1.0)
        gap = ((lp16 - lp32).abs() * batch.response_mask).max().item()
        stats = t.train_step(STATE["batch"], 1, 1, 8, True)
        assert all(p.dtype == torch.float32 for p in t.model.parameters()) and gap < 0.1, gap
        assert t.model.is_gradient_checkpointing and torch.isfinite(torch.tensor(stats["policy_loss"]))
        return f"log-prob gap {gap:.1e}, checkpointed step loss {stats['policy_loss']:.3f} on {t.device}"

    @check("LoRA (peft): adapters, merge, base ref")
    def _():
        from workers.trainer import PolicyTrainer
        from workers.trainer_parts import FrozenBase

        try:
            from orchestrator.core.spec import LoraSpec

            lora = LoraSpec(rank=4, alpha=8.0)
        except ImportError:
            from types import SimpleNamespace as NS

            lora = NS(rank=4, alpha=8.0, target_modules="all-linear", dropout=0.0)
        optim, rollout = configs()
        t = PolicyTrainer(model_dir, with_fields(optim, lr=5e-2), rollout, num_gpus=NUM_GPUS, lora=lora, parts=[FrozenBase(temperature=1.0)])
        base = {k: v.clone() for k, v in t.rollout_weights().items()}
        for step in (1, 2):
            t.train_step(STATE["batch"], step, 1, 8, True)
        merged = t.rollout_weights()
        moved = sum(not torch.equal(merged[k], base[k]) for k in base)
        ref, _ = t.compute_logprobs(STATE["batch"])
        gap = ((ref.to(STATE["batch"].ref_logprobs.device) - STATE["batch"].ref_logprobs).abs() * STATE["batch"].response_mask).max().item()
        assert moved and set(merged) == set(base) and gap < LOGPROB_ATOL, (moved, gap)
        return f"{moved} merged tensors moved; base-as-reference gap {gap:.1e} on {t.device}"

    @check("FSDP2 fully_shard, one process")
    def _():
        import os

        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard

        from workers.common import load_model

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        from workers.training import free_port

        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group("nccl" if CUDA else "gloo", rank=0, world_size=1)
        try:
            device = "cuda" if CUDA else "cpu"
            batch = STATE["batch"].to(device)
            plain, sharded = (load_model(model_dir, device=device) for _ in range(2))
            for layer in sharded.model.layers:
                fully_shard(layer)
            fully_shard(sharded)
            losses = []
            for model in (plain, sharded):
                lp, _ = response_logprobs(model, batch, 1.0)
                loss = -(lp * batch.response_mask).sum() / batch.response_mask.sum()
                loss.backward()
                losses.append(loss.item())
            gap = max((p.grad - q.grad.full_tensor()).abs().max().item() for p, q in zip(plain.parameters(), sharded.parameters()))
            assert abs(losses[0] - losses[1]) < 1e-5 and gap < 1e-5, (losses, gap)
            return f"loss {losses[1]:.4f} = unsharded, max |grad gap| {gap:.1e}"
        finally:
            dist.destroy_process_group()

    @check("Critic values + train_step")
    def _():
        from workers.critic import Critic

        c = Critic(model_dir, configs()[0], num_gpus=NUM_GPUS)
        batch = STATE["batch"]
        values, _ = c.compute_values(batch)
        token_rewards = algos.token_level_rewards(batch.scores, batch.response_mask, None, 0.0)
        adv, returns = algos.gae_advantages(token_rewards, values, batch.response_mask, 1.0, 0.95)
        stats = c.train_step(batch.replace(values=values, returns=returns, advantages=adv), 1, 1, 8)
        assert all(torch.isfinite(torch.tensor(v)) for v in stats.values()), stats
        return f"{len(stats)} stats finite on {c.device}"

    @check("weights trainer -> rollout")
    def _():
        weights = STATE["trainer"].state_dict()
        seconds = STATE["rollout"].load_weights(weights)
        back = STATE["rollout"].state_dict()
        assert all(torch.equal(back[k], weights[k]) for k in weights)
        nbytes = sum(v.numel() * v.element_size() for v in weights.values())
        return f"equal; {nbytes / 1e6:.1f} MB in {seconds * 1e3:.1f} ms"

    @check("synced log-probs rollout = trainer")
    def _():
        batch, _ = STATE["rollout"].generate(PROMPTS, [{} for _ in PROMPTS], step=2)
        t = STATE["trainer"]
        with torch.no_grad():
            ours, _ = response_logprobs(t.model, batch.to(t.device), 1.0)
        gap = ((ours.cpu() - batch.logprobs).abs() * batch.response_mask).max().item()
        assert gap < LOGPROB_ATOL, f"differ by {gap:.1e}"
        return f"max gap {gap:.1e} (tol {LOGPROB_ATOL:.0e})"

    @check("async step: chunks across a sync")
    def _():
        # Asynchronous training's rollout (docs/async.md): completions in chunks of 3 tokens, the trainer's weights
        # loaded between two chunks; each token's recorded log-prob is that of the weights that drew it.
        from orchestrator.core.batch import concat
        from workers.rollout import HFRollout

        r = HFRollout(model_dir, n=N, max_new_tokens=8, seed=0, num_gpus=NUM_GPUS)
        done, _, _ = r.stream([0, 1, 2, 3], PROMPTS, [{} for _ in PROMPTS], 0, 3)
        r.load_weights(STATE["trainer"].state_dict())  # version 1
        for _ in range(4):
            done += r.stream([], [], [], 1, 3)[0]
        assert sorted(k for k, _, _ in done) == [0, 1, 2, 3], [k for k, _, _ in done]
        batch, versions = concat([b for _, b, _ in done]), torch.cat([v for _, _, v in done])
        later = (versions == 1) & batch.response_mask.bool()
        assert (versions == 0).any() and later.any(), "no completion spans the sync"
        t = STATE["trainer"]
        with torch.no_grad():
            ours, _ = response_logprobs(t.model, batch.to(t.device), 1.0)
        gap = ((ours.cpu() - batch.logprobs).abs() * later).max().item()
        assert gap < LOGPROB_ATOL, f"version-1 tokens' log-probs differ from the trainer's by {gap:.1e}"
        scores = torch.rand(len(batch), generator=torch.Generator().manual_seed(1))
        STATE["async_batch"] = batch.replace(scores=scores, advantages=algos.grpo_advantages(scores, batch.group_ids, batch.response_mask))
        return f"versions {{0, 1}} in {len(done)} groups, max gap {gap:.1e} on {r.device}"

    @check("async step: decoupled update")
    def _():
        # The update of asynchronous training: pi_prox the trainer's weights, each token weighted by pi_prox / pi_behav.
        from workers.trainer import PolicyTrainer

        optim, rollout = configs(max_staleness=1)
        t = PolicyTrainer(model_dir, optim, rollout, num_gpus=NUM_GPUS)
        t.model.load_state_dict(STATE["trainer"].state_dict())
        stats = t.train_step(STATE["async_batch"], 2, 1, None, True)
        assert all(torch.isfinite(torch.tensor(v)) for v in stats.values()), stats
        assert stats["off_policy/ratio_min"] < 1.0 or stats["off_policy/ratio_max"] > 1.0, "no token was off-policy"
        return f"ratio {stats['off_policy/ratio_min']:.2f}..{stats['off_policy/ratio_max']:.2f} on {t.device}"

    @check("Tinker adapter pool (LoRA loop)")
    def _():
        # The Tinker API's pool with RLHF_API_TINKER_POOL_GPUS: base model and adapters on the device, states saved on the CPU.
        from workers.tinker_pool import AdapterPool

        pool = AdapterPool(model_dir, threads=1, num_gpus=NUM_GPUS)
        pool.create("run", rank=8, seed=0, train_unembed=False)
        seq = list(range(5, 30))
        datum = {"tokens": seq[:-1], "inputs": {"target_tokens": seq[1:], "weights": [1.0] * (len(seq) - 1)}}
        losses = []
        for _ in range(5):
            losses.append(pool.forward_backward("run", [datum], "cross_entropy")["loss"])
            pool.optim_step("run", learning_rate=1e-2)
        assert losses[-1] < losses[0], losses
        path = pool.save_state("run", str(Path(tmp) / "pool-run"))
        state = torch.load(Path(path) / "state.pt", weights_only=True)
        assert all(v.device.type == "cpu" for v in state["weights"].values())
        pool.load_state("run", path, optimizer=True)
        [sample] = pool.sample(path, seq[:4], 1, max_tokens=6, temperature=0.0, stop=[])
        assert len(sample["tokens"]) == 6 and len(sample["logprobs"]) == 6
        return f"loss {losses[0]:.2f} -> {losses[-1]:.2f} in 5 steps, sampled on {pool.device}"

    @check("bucketed pack/unpack (NCCL layout)")
    def _():
        from workers.weight_transport import bucket_size, pack_bucket, plan_buckets, unpack_bucket

        state = STATE["trainer"].model.state_dict()
        buckets = plan_buckets(state.items(), bucket_bytes=1 << 20)
        for metas in buckets:
            flat = torch.empty(bucket_size(metas), dtype=torch.uint8, device=next(iter(state.values())).device)
            for name, t in unpack_bucket(pack_bucket(metas, state, flat), metas):
                assert torch.equal(t, state[name]), name
        return f"{len(buckets)} buckets of <= 1 MiB"

    @check("CUDA IPC round trip (colocated sync)")
    def _():
        if not CUDA:
            return "skipped: needs CUDA"
        import torch.multiprocessing as mp

        from workers.weight_transport import cuda_ipc_payload

        handles, buckets, flat = cuda_ipc_payload(STATE["trainer"].model.state_dict())
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_ipc_child, args=(handles, buckets, queue))
        proc.start()
        checksum = queue.get(timeout=120)
        proc.join(timeout=60)
        want = sum(float(v.double().sum()) for v in STATE["trainer"].model.state_dict().values())
        assert abs(checksum - want) < 1e-6 * max(1.0, abs(want)), (checksum, want)
        return f"{flat.numel() / 1e6:.1f} MB shared, checksums agree"

    print()
    print(f"{'check':<38} {'result':<6} {'seconds':>8}  detail")
    print("-" * 100)
    for name, status, detail, seconds in ROWS:
        print(f"{name:<38} {status:<6} {seconds:>8.2f}  {detail}")
    return 0 if all(r[1] != "FAIL" for r in ROWS) else 1


def _ipc_child(handles, buckets, queue) -> None:
    """A second process (as the engine's worker would be) maps the trainer's buffer by its IPC handle."""
    from workers.weight_transport import bucket_size, unpack_bucket

    func, args = handles[str(torch.cuda.get_device_properties(0).uuid)]
    args = list(args)
    args[6] = 0
    flat = func(*args)
    total, base = 0.0, 0
    for metas in buckets:
        total += sum(float(t.double().sum()) for _, t in unpack_bucket(flat[base : base + bucket_size(metas)], metas))
        base += bucket_size(metas)
    queue.put(total)


if __name__ == "__main__":
    sys.exit(main())
