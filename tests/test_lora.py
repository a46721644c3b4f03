"""LoRA on the policy and the PPO critic (`model.lora`, peft): only the adapters train, the frozen base is the
reference, rollouts and `policy/` get the merged weights under the base model's names, and a resume
from the adapters is exact. The trainer as a plain class (no Ray), then a PPO job with a KL penalty
on a real local Ray that starts no reference actor."""

from __future__ import annotations

import pytest
import ray
import torch

from orchestrator.core.spec import LoraSpec, OptimSpec, RolloutSpec
from tests.test_packing import grads_after_step, varied_batch
from workers.common import load_model, response_logprobs
from workers.trainer import PolicyTrainer
from workers.trainer_parts import FrozenBase

LORA = LoraSpec(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "up_proj"])


def lora_trainer(tiny_model, lr: float = 5e-2, parts=()) -> PolicyTrainer:
    return PolicyTrainer(str(tiny_model), OptimSpec(lr=lr, prompts_per_step=12, seed=0), RolloutSpec(n=1, max_new_tokens=12),
                         threads=1, lora=LORA, parts=parts)


def one_step(trainer: PolicyTrainer, seed: int = 0) -> dict[str, float]:
    batch = varied_batch(seed=seed)
    return trainer.optimizer_step(batch, 6, lambda mb, t, s: trainer._loss(mb, True, t, s))


def test_only_the_adapters_train_and_the_merged_weights_carry_them(tiny_model):
    trainer = lora_trainer(tiny_model)
    base = load_model(str(tiny_model)).state_dict()
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_A" in n or "lora_B" in n for n in trained)
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {id(p) for n, p in trainer.model.named_parameters() if n in trained}
    # Before training, B = 0: the merged weights are the base's, under the base's own names.
    merged = trainer.rollout_weights()
    assert set(merged) == set(base)
    assert all(torch.equal(merged[k], base[k]) for k in base)

    _, grads = grads_after_step(trainer, varied_batch(), size=6)  # lr 0 inside: gradients only
    assert set(grads) == trained
    for group in trainer.optimizer.param_groups:
        group["lr"] = 5e-2
    for seed in range(3):
        one_step(trainer, seed)
    after = trainer.model.get_base_model().state_dict()
    frozen = {k.replace(".base_layer.", "."): v for k, v in after.items() if "lora_" not in k}
    assert all(torch.equal(frozen[k], base[k]) for k in base), "a base weight moved"
    merged = trainer.rollout_weights()
    moved = sorted(k for k in base if not torch.equal(merged[k], base[k]))
    assert moved and all(any(m in k for m in ("q_proj", "v_proj", "up_proj")) for k in moved), moved
    # The merged model computes what the adapted one does.
    batch = varied_batch(seed=5)
    plain = load_model(str(tiny_model))
    plain.load_state_dict(merged, strict=False)
    with torch.no_grad():
        ours, _ = response_logprobs(trainer.model.eval(), batch)
        theirs, _ = response_logprobs(plain.eval(), batch)
    torch.testing.assert_close(theirs * batch.response_mask, ours * batch.response_mask, rtol=1e-4, atol=1e-5)


def test_the_frozen_base_is_the_reference(tiny_model):
    trainer = lora_trainer(tiny_model, parts=[FrozenBase(temperature=1.0)])
    for seed in range(2):
        one_step(trainer, seed)
    batch = varied_batch(seed=6)
    ref, seconds = trainer.compute_logprobs(batch)
    base = load_model(str(tiny_model)).eval()
    with torch.no_grad():
        expected, _ = response_logprobs(base, batch)
    torch.testing.assert_close(ref, expected * batch.response_mask, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        policy, _ = response_logprobs(trainer.model, batch)
    assert (policy - expected).abs().max() > 1e-3  # the adapters are back on afterwards
    assert seconds > 0 and trainer.model.training


def test_resume_from_the_adapters_is_exact(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    first = lora_trainer(tiny_model)
    for seed in range(2):
        one_step(first, seed)
    first.save(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "policy_adapter" / "adapter_model.safetensors").exists()
    # policy/ is the merged model in HF layout: it loads in transformers without peft.
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "policy").state_dict()
    merged = first.rollout_weights()
    assert all(torch.equal(exported[k], merged[k]) for k in merged)

    second = lora_trainer(tiny_model)
    second.load(str(tmp_path / "ckpt"))
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()))
    one_step(first, 2)
    one_step(second, 2)
    for (name, a), b in zip(first.model.named_parameters(), second.model.parameters()):
        assert torch.equal(a, b), f"{name} differs after the same step on the resumed trainer"


def test_a_lora_critic_trains_its_adapters_and_value_head_and_resumes_exactly(tiny_model, tmp_path):
    """PPO's critic with `model.lora`: the base stays as loaded, the adapters and the new value head
    learn (the value loss falls), and its checkpoint (those alone) resumes it exactly."""
    from workers.critic import Critic

    def critic():
        return Critic(str(tiny_model), OptimSpec(critic_lr=1e-2, prompts_per_step=12, seed=5), threads=1, lora=LoraSpec(rank=4, alpha=8))

    batch = varied_batch(seed=3)
    first = critic()
    base = {n: p.detach().clone() for n, p in first.model.named_parameters() if not p.requires_grad}
    trained = sorted(n for n, p in first.model.named_parameters() if p.requires_grad)
    assert trained and all("lora_" in n or ".score." in n for n in trained), trained
    assert any(".score." in n for n in trained), "the value head is new: it must train"
    losses = [first.train_step(batch, step, 1, None)["value_loss"] for step in range(1, 6)]
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, base[n]) for n, p in first.model.named_parameters() if n in base)

    first.save(str(tmp_path))
    saved = torch.load(tmp_path / "critic.pt", weights_only=False)["model"]
    assert sorted(saved) == sorted(k for k in first.model.state_dict() if k in trained)
    second = critic()
    second.load(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()))
    a, b = first.train_step(batch, 6, 1, None), second.train_step(batch, 6, 1, None)
    assert (a["value_loss"], a["value_clip_ratio"]) == (b["value_loss"], b["value_clip_ratio"])
    torch.testing.assert_close(first.compute_values(batch)[0], second.compute_values(batch)[0], rtol=0, atol=0)


@pytest.mark.slow
def test_ppo_with_lora_and_kl_runs_without_a_reference_actor(ray_session, tiny_model, arith_file, tmp_path):
    from tests.conftest import read_jsonl, tiny_spec
    from tests.test_e2e import check_run, start

    spec = tiny_spec(tiny_model, arith_file, tmp_path / "lora", algorithm={"name": "ppo"}, optim={"steps": 2, "kl_coef": 0.05, "lr": 5e-2},
                     model={"path": str(tiny_model), "lora": {"rank": 4, "alpha": 8, "target_modules": "all-linear"}},
                     checkpoint={"every": 2}, resources={"rollout_in": "actor"})  # a rollout actor, to get the merged weights
    orch = start(spec)
    try:
        metrics = check_run(orch, tiny_model, {"rollout", "trainer", "critic"})  # no "reference"
        critic_trained = ray.get(orch.groups["critic"].actors[0].__ray_call__.remote(
            lambda self: sorted(n for n, p in self.model.named_parameters() if p.requires_grad)))
    finally:
        orch.shutdown()
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1: policy = base
    assert metrics[-1]["kl"] > 0  # then the adapters moved it away from the base
    ckpt = orch.spec.checkpoint_dir / "step_000002"
    assert (ckpt / "policy_adapter" / "adapter_config.json").exists() and (ckpt / "policy" / "tokenizer_config.json").exists()
    # The critic has adapters too (and its value head): its checkpoint holds those alone.
    assert critic_trained and all("lora_" in n or ".score." in n for n in critic_trained), critic_trained
    assert sorted(torch.load(ckpt / "critic.pt", weights_only=False)["model"]) == critic_trained
    assert [e for e in read_jsonl(orch.spec.run_dir / "events.jsonl") if e["type"] == "checkpoint"]


def test_a_target_module_the_model_lacks_is_named(tiny_model):
    from workers.common import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"model.lora.target_modules=\['qkv_fused'\]: .*qkv_fused"):
        PolicyTrainer(str(tiny_model), OptimSpec(lr=1e-3), RolloutSpec(), threads=1, lora=LoraSpec(target_modules=["qkv_fused"]))
