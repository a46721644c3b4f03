"""FSDP2 (`resources.<role>.strategy: fsdp`) on a real local Ray: a PPO job whose trainer, critic and
reference each have 2 sharded replicas on the CPU (gloo) gives the same losses and weights as DDP
after 3 steps, resumes from its sharded checkpoint exactly, and the same checkpoint resumes on one
unsharded replica of each (resharded). Below: the collectives' corner cases in 2 plain processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from orchestrator.core.batch import micro_batches
from tests.conftest import read_jsonl, tiny_spec

pytestmark = pytest.mark.slow

WEIGHT_ATOL = 1e-5  # after 3 Adam steps of lr 1e-2, for weights reduced in another order (see below)
COMPARED = ("policy_loss", "grad_norm", "entropy", "kl", "reward/mean", "value_loss", "critic/values/mean")


def run(tiny_model, arith_file, out, strategy: str, steps: int = 3, resume_from=None, replicas: int = 2):
    from tests.test_e2e import start

    roles = {role: {"replicas": replicas, "strategy": strategy, "num_cpus": 0.25} for role in ("trainer", "critic", "reference")}
    spec = tiny_spec(tiny_model, arith_file, out, algorithm={"name": "ppo"},
                     optim={"steps": steps, "lr": 1e-2, "critic_lr": 1e-2, "kl_coef": 0.05, "prompts_per_step": 4},
                     resources={**roles, "torch_threads": 1, "rollout_in": "actor"}, checkpoint={"every": 1})
    orch = start(spec)
    try:
        first = 0 if resume_from is None else orch.load_checkpoint(resume_from)
        orch.fit(first)
        # What the trainer published to the rollouts after its last update (FSDP: gathered tensor by tensor).
        weights = ray.get(orch.groups["rollout"].actors[0].state_dict.remote())
    finally:
        orch.shutdown()
    # The last checkpoint's policy/ (FSDP: written in buckets) holds the same weights, in HF layout.
    saved = AutoModelForCausalLM.from_pretrained(orch.spec.checkpoint_dir / f"step_{steps:06d}" / "policy").state_dict()
    assert all(torch.equal(saved[k], weights[k]) for k in weights), "the checkpoint's weights differ from the published ones"
    return read_jsonl(orch.spec.run_dir / "metrics.jsonl"), weights, orch.spec.checkpoint_dir


def test_fsdp_ppo_matches_ddp_and_resumes_exactly(ray_session, tiny_model, arith_file, tmp_path):
    ddp_metrics, ddp_weights, _ = run(tiny_model, arith_file, tmp_path / "ddp", "ddp")
    fsdp_metrics, fsdp_weights, ckpts = run(tiny_model, arith_file, tmp_path / "fsdp", "fsdp")
    assert [m["step"] for m in fsdp_metrics] == [1, 2, 3]
    for ours, theirs in zip(fsdp_metrics, ddp_metrics):
        for key in COMPARED:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-5), (ours["step"], key)  # (PPO's policy loss is ~0: whitened advantages)
    for name, tensor in ddp_weights.items():
        if "k_proj.bias" in name:
            # A key bias shifts every score of a query alike, which softmax ignores: its true gradient is 0,
            # so Adam turns float noise (which differs between the two reductions) into steps of up to lr.
            assert (fsdp_weights[name] - tensor).abs().max() <= 3 * 1e-2 + 1e-6, name
            continue
        # Elsewhere Adam amplifies float noise less, but an element with a tiny second moment can still move a
        # few 1e-6 apart (seen on an AMD EPYC: 1 of 16,384 o_proj weights, 1.8e-6). A real fault (a gradient
        # scaled or dropped) moves many elements by ~lr = 1e-2: 1e-5 is a thousand times below that.
        torch.testing.assert_close(fsdp_weights[name], tensor, rtol=1e-4, atol=WEIGHT_ATOL, msg=name)
    step2 = ckpts / "step_000002"
    assert (step2 / "policy_dcp" / ".metadata").exists() and (step2 / "policy" / "config.json").exists()
    assert (step2 / "critic_dcp" / ".metadata").exists() and not (step2 / "critic.pt").exists()

    # From the sharded checkpoint of step 2, step 3 again: the same metrics and the same weights.
    resumed_metrics, resumed_weights, _ = run(tiny_model, arith_file, tmp_path / "resumed", "fsdp", resume_from=step2)
    assert [m["step"] for m in resumed_metrics] == [3]
    for key in COMPARED:
        assert resumed_metrics[0][key] == pytest.approx(fsdp_metrics[2][key], rel=1e-6, abs=1e-9), key
    for name, tensor in fsdp_weights.items():
        assert torch.equal(resumed_weights[name], tensor), name

    # The same checkpoint on one unsharded replica: DCP gathers the shards; the same step 3 up to float order.
    single_metrics, single_weights, _ = run(tiny_model, arith_file, tmp_path / "single", "ddp", resume_from=step2, replicas=1)
    assert [m["step"] for m in single_metrics] == [3]
    for key in COMPARED:
        assert single_metrics[0][key] == pytest.approx(fsdp_metrics[2][key], rel=1e-4, abs=1e-6), key
    for name, tensor in fsdp_weights.items():
        if "k_proj.bias" not in name:
            torch.testing.assert_close(single_weights[name], tensor, rtol=1e-4, atol=WEIGHT_ATOL, msg=name)


def _uneven_rank(rank: int, ports: list[int], model_dir: str, out: str) -> None:
    """Rank `rank` of 2 trainer replicas, DDP then FSDP (a process group each), on unlike shares."""
    import json

    import torch.distributed as dist

    from orchestrator.core.spec import OptimSpec, RolloutSpec
    from tests.test_packing import varied_batch
    from workers.trainer import PolicyTrainer

    torch.set_num_threads(1)
    batch, result = varied_batch(seed=7), {}
    # Rank 0 gets the 2 shortest rows (one micro-batch), rank 1 the 4 longest (several): unlike counts.
    order = (batch.response_mask.sum(1) + batch.attention_mask[:, : batch.prompt_len].sum(1)).argsort()
    mine = batch.select(order[:2] if rank == 0 else order[-4:])
    for i, strategy in enumerate(("ddp", "fsdp")):
        trainer = PolicyTrainer(model_dir, OptimSpec(lr=1e-2, prompts_per_step=12, micro_batch_tokens=24, grad_clip=None),
                                RolloutSpec(n=1, max_new_tokens=12), threads=1)
        trainer.init_distributed(("127.0.0.1", ports[i]), rank, 2, strategy)
        stats = trainer.optimizer_step(mine, None, lambda mb, t, s: trainer._loss(mb, True, t, s), 24)
        result[strategy] = {"parts": len(micro_batches(mine, None, 24)), **stats}
        dist.destroy_process_group()
    Path(out).write_text(json.dumps(result))


def test_fsdp_with_unlike_micro_batch_counts_per_rank_matches_ddp(tiny_model, tmp_path):
    import json
    import multiprocessing

    from workers.training import free_port

    ctx, ports = multiprocessing.get_context("spawn"), [free_port(), free_port()]  # a process group for each strategy
    procs = [ctx.Process(target=_uneven_rank, args=(r, ports, str(tiny_model), str(tmp_path / f"rank{r}"))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)  # a rank left waiting in a collective would hang here: the test then fails
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0], "a rank did not finish"
    ranks = [json.loads((tmp_path / f"rank{r}").read_text()) for r in range(2)]
    assert ranks[0]["fsdp"]["parts"] < ranks[1]["fsdp"]["parts"]
    for key in ("policy_loss", "grad_norm"):
        assert ranks[0]["fsdp"][key] == pytest.approx(ranks[0]["ddp"][key], rel=1e-4), key


def _sharded_roles_rank(rank: int, port: int, model_dir: str, out: str) -> None:
    """Rank `rank` of a 2-replica sharded reference, critic and trainer; rank 1 builds each model
    empty (meta device) and gets its shards from rank 0."""
    import json

    import torch.distributed as dist

    from orchestrator.core.spec import OptimSpec, RolloutSpec
    from tests.test_packing import varied_batch
    from workers.critic import Critic
    from workers.reference import Reference
    from workers.trainer import PolicyTrainer

    torch.set_num_threads(1)
    batch, result = varied_batch(seed=7), {}
    empty = rank > 0  # (rank 0 loads the weights on the CPU)
    optim = OptimSpec(critic_lr=1e-2, prompts_per_step=12, micro_batch_tokens=24, grad_clip=None, seed=3)

    reference = Reference(model_dir, micro_batch_tokens=24, threads=1, shard_rank=rank)
    assert all(p.is_meta for p in reference.model.parameters()) == empty
    reference.init_distributed(("127.0.0.1", port), rank, 2, "fsdp")
    # Rank 0 scores the 2 shortest rows (one forward), rank 1 the 4 longest (several).
    order = (batch.response_mask.sum(1) + batch.attention_mask[:, : batch.prompt_len].sum(1)).argsort()
    mine = order[:2] if rank == 0 else order[-4:]
    logprobs, _ = reference.compute_logprobs(batch.select(mine))
    result["reference"] = {"rows": mine.tolist(), "logprobs": logprobs.tolist()}
    dist.destroy_process_group()

    critic = Critic(model_dir, optim, threads=1, shard_rank=rank)
    critic.init_distributed(("127.0.0.1", port + 1), rank, 2, "fsdp")
    half = batch.select(slice(0, 6) if rank == 0 else slice(6, 12))
    result["critic_loss"] = [critic.train_step(half, step, 1, None)["value_loss"] for step in (1, 2)]
    result["values"] = critic.compute_values(half)[0].tolist()
    dist.destroy_process_group()

    trainer = PolicyTrainer(model_dir, optim, RolloutSpec(n=1, max_new_tokens=12), threads=1, shard_rank=rank)
    trainer.init_distributed(("127.0.0.1", port + 2), rank, 2, "fsdp")
    full = dict(trainer.iter_full_tensors())  # what every rank gathers: rank 0's weights, as loaded
    result["trainer_weights"] = {k: v.sum().item() for k, v in full.items()}
    Path(out).write_text(json.dumps(result))


def test_sharded_reference_critic_and_trainer_built_empty_match_one_replica(tiny_model, tmp_path):
    """2 fsdp replicas, the second built without weights: the reference's log-probs (uneven
    forwards per rank), the critic's losses and values after 2 updates, and the trainer's weights
    are those of one unsharded replica given the whole batch."""
    import json
    import multiprocessing

    from orchestrator.core.spec import OptimSpec
    from tests.test_packing import varied_batch
    from workers.critic import Critic
    from workers.reference import Reference
    from workers.training import free_port

    ctx, port = multiprocessing.get_context("spawn"), free_port()
    procs = [ctx.Process(target=_sharded_roles_rank, args=(r, port, str(tiny_model), str(tmp_path / f"rank{r}"))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0], "a rank did not finish"
    ranks = [json.loads((tmp_path / f"rank{r}").read_text()) for r in range(2)]

    batch = varied_batch(seed=7)
    whole = Reference(str(tiny_model), micro_batch_tokens=24, threads=1).compute_logprobs(batch)[0]
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["reference"]["logprobs"]), whole[r["reference"]["rows"]], rtol=1e-5, atol=1e-6)

    critic = Critic(str(tiny_model), OptimSpec(critic_lr=1e-2, prompts_per_step=12, micro_batch_tokens=24, grad_clip=None, seed=3), threads=1)
    losses = [critic.train_step(batch, step, 1, None)["value_loss"] for step in (1, 2)]
    for r in ranks:  # (each rank's stats are the whole mini-batch's: summed across ranks)
        assert r["critic_loss"] == pytest.approx(losses, rel=1e-4)
    values = critic.compute_values(batch)[0]
    torch.testing.assert_close(torch.tensor(ranks[0]["values"] + ranks[1]["values"]), values, rtol=1e-4, atol=1e-5)

    loaded = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    for r in ranks:
        assert r["trainer_weights"] == {k: pytest.approx(v.sum().item(), rel=1e-6, abs=1e-6) for k, v in loaded.items()}


def test_sharded_replicas_refuse_a_checkpoint_without_shards_by_name(tiny_model, tmp_path):
    from orchestrator.core.spec import OptimSpec
    from workers.critic import Critic

    critic = Critic(str(tiny_model), OptimSpec(), threads=1)
    critic.save(str(tmp_path))  # unsharded: critic.pt, no critic_dcp/
    with pytest.raises(RuntimeError, match=r"was written by unsharded replicas \(it has no critic_dcp/\): resume it with strategy ddp"):
        critic._load_sharded(str(tmp_path), "critic")  # what sharded replicas run on load
