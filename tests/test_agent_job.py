"""Multi-turn GRPO jobs on a real Ray with the tiny model (issue 30): the calculator tool after an SFT
warm start on tool-call traces, and a reasoning-gym task run unmodified; the recorded trajectories
are what was trained on, token for token."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from orchestrator.core.environments import CalculatorEnv
from tests.conftest import ROOT, read_jsonl, run_entrypoint, tiny_spec, write_spec
from tests.test_agent_rollout import check_token_identity, mask_runs
from workers.agent_rollout import Trajectory

pytestmark = pytest.mark.slow


def tool_data():
    spec = importlib.util.spec_from_file_location("tools_make_data", ROOT / "examples" / "tools" / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(spec: dict, tmp_path, ray_head) -> list[dict]:
    """Run the job through the real entrypoint on the session's Ray; its events, after checking it succeeded."""
    result = run_entrypoint(write_spec(tmp_path / "job.yaml", spec), ray=ray_head, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    events = read_jsonl(tmp_path / "out" / "events.jsonl")
    assert [e["status"] for e in events if e["type"] == "status"] == ["starting", "running", "succeeded"]
    return events


def agent_metrics_of(tmp_path, first_step: int) -> list[dict]:
    metrics = [m for m in read_jsonl(tmp_path / "out" / "metrics.jsonl") if m["step"] >= first_step]
    for m in metrics:
        agent = {k: v for k, v in m.items() if k.startswith(("agent/", "rewards/environment/"))}
        assert len(agent) >= 8 and all(math.isfinite(v) for v in agent.values()), m
    return metrics


def trajectory(record: dict) -> Trajectory:
    return Trajectory(ids=record["ids"], prompt_len=record["prompt_len"], messages=record["messages"], text="", env=None,
                      mask=record["mask"], logprobs=record["logprobs"])


def test_a_multi_turn_grpo_job_with_the_calculator_tool(ray_head, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make = tool_data()
    make.write(tmp_path / "data", sft=512, prompts=32, test=0, teacher_guess=0.0)
    sft_steps = 80
    spec = tiny_spec(tiny_model, tmp_path / "data" / "sft.jsonl", tmp_path / "out", rewards=[],
                     data={"max_prompt_length": 64, "max_completion_length": 160},
                     rollout={"n": 2, "max_new_tokens": 100, "agent": {"environment": "calculator", "kwargs": {"system": make.SYSTEM},
                                                                       "max_turns": 3, "max_tokens": 256}},
                     stages=[{"name": "sft", "algorithm": {"name": "sft"}, "optim": {"lr": 3e-3, "steps": sft_steps, "prompts_per_step": 16}},
                             {"name": "grpo", "algorithm": {"name": "grpo"}, "data": {"train_file": str(tmp_path / "data" / "prompts.jsonl")},
                              "optim": {"steps": 2, "prompts_per_step": 4}}])
    events = run(spec, tmp_path, ray_head)
    agent_metrics_of(tmp_path, sft_steps + 1)
    records = read_jsonl(tmp_path / "out" / "trajectories.jsonl")
    assert [r["step"] for r in records] == [sft_steps + 1] * 2 + [sft_steps + 2] * 2  # the first prompt's n episodes, each step
    # The SFT stage taught the call's shape: some episode called the calculator (a call, valid or not, gets
    # an observation), read the tool's message and answered in another turn.
    assert any(r["turns"] >= 2 and r["tool_calls"] + r["invalid_calls"] for r in records), [r["messages"][2:] for r in records]
    for r in records:
        assert [m["role"] for m in r["messages"][:2]] == ["system", "user"] and len(r["rewards"]) == r["turns"]
        assert r["reward"] == sum(r["rewards"]) and r["final"] == r["messages"][-1]["content"]
    # Token in, token out on what the job recorded: the first GRPO step sampled with the SFT stage's final
    # weights; each generated run is an assistant turn, observations are masked, log-probs recompute.
    sft_final = next(e["path"] for e in events if e["type"] == "checkpoint" and e.get("stage") == "sft")
    model = AutoModelForCausalLM.from_pretrained(f"{sft_final}/policy").eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    first = [trajectory(r) for r in records if r["step"] == sft_steps + 1]
    for t, r in zip(first, records):
        opening = tok.apply_chat_template(t.messages[:2], tools=CalculatorEnv.tools, add_generation_prompt=True, tokenize=False)
        assert t.ids[: t.prompt_len] == tok.encode(opening, add_special_tokens=False)
        runs = mask_runs(t)
        generated = [tok.decode(ids).removesuffix("<|im_end|>") for m, ids in runs if m]
        assert generated == [m["content"] for m in t.messages if m["role"] == "assistant"] and len(generated) == r["turns"]
        for (m, ids), tool in zip([x for x in runs if not x[0]], [m for m in t.messages if m["role"] == "tool"]):
            assert tool["content"] in tok.decode(ids)  # an observation run holds the tool's result, loss mask 0
    with torch.no_grad():
        check_token_identity(model, tok, first)


def test_a_job_on_a_reasoning_gym_task(ray_head, tiny_model, tmp_path):
    pytest.importorskip("reasoning_gym")
    rows = [{"prompt": "-", "task": "basic_arithmetic", "index": i} for i in range(16)]
    (tmp_path / "rg.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = tiny_spec(tiny_model, tmp_path / "rg.jsonl", tmp_path / "out", rewards=[{"function": "length_penalty", "weight": 0.1}],
                     rollout={"n": 2, "max_new_tokens": 8, "agent": {"environment": "reasoning_gym", "max_tokens": 128}},
                     optim={"steps": 2, "prompts_per_step": 4})
    run(spec, tmp_path, ray_head)
    metrics = agent_metrics_of(tmp_path, 1)
    assert [m["step"] for m in metrics] == [1, 2] and all(m["agent/turns_per_episode"] == 1.0 for m in metrics)
    assert all("rewards/length_penalty/mean" in m for m in metrics)  # the job's reward functions add to the environment's
    [first, *_] = read_jsonl(tmp_path / "out" / "trajectories.jsonl")
    assert first["messages"][0]["content"].startswith("Calculate ")  # reasoning-gym's own question, not the row's prompt


def test_a_job_with_sandbox_actors_places_them_and_hands_them_to_the_rollout(ray_head, tiny_model, arith_file, tmp_path):
    # The tiny model calls no tool here: this is about placement (the sandbox role in the job's
    # placement group, its actors handed to whoever samples) and a clean end.
    spec = tiny_spec(tiny_model, arith_file, tmp_path / "out", rewards=[],
                     rollout={"n": 2, "max_new_tokens": 8, "agent": {"environment": "python_calculator", "max_tokens": 300}},
                     optim={"steps": 1, "prompts_per_step": 2})
    events = run(spec, tmp_path, ray_head)
    [placed] = [e for e in events if e["type"] == "placement"]
    assert placed["bundles"] == [{"CPU": 1.0}, {"CPU": 0.25}, {"CPU": 0.25}]
    [ready] = [e for e in events if e["type"] == "actors_ready"]
    assert sorted(a.split("/")[-1] for a in ready["actors"]) == ["sandbox-0", "sandbox-1", "trainer-0"]


def test_an_async_multi_turn_job_keeps_the_staleness_bound(ray_head, tiny_model, tmp_path):
    # rollout.max_staleness 1 with an environment: episodes run whole on the rollout actor while the trainer
    # updates, new weights between two batches of episodes; every trained token within the bound.
    check_async_multi_turn(tiny_model, tmp_path, ray_head, backend="hf")


def check_async_multi_turn(tiny_model, tmp_path, ray_head, backend: str) -> None:
    """An async (k=1) calculator job of 4 steps on `backend`: each step's groups within the bound, each drawn prompt
    trained once, the agent's metrics and one recorded episode per sample of a step's first prompt."""
    make = tool_data()
    make.write(tmp_path / "data", sft=0, prompts=24, test=0)
    k, steps, per_step = 1, 4, 3
    spec = tiny_spec(tiny_model, tmp_path / "data" / "prompts.jsonl", tmp_path / "out", rewards=[], data={"max_prompt_length": 64},
                     rollout={"n": 2, "max_new_tokens": 12, "max_staleness": k, "backend": backend,
                              "agent": {"environment": "calculator", "kwargs": {"system": make.SYSTEM}, "max_turns": 2, "max_tokens": 96}},
                     optim={"steps": steps, "prompts_per_step": per_step})
    events = run(spec, tmp_path, ray_head)
    trained = [e for e in events if e["type"] == "trained_prompts"]
    assert [e["step"] for e in trained] == list(range(1, steps + 1))
    for e in trained:
        assert e["step"] - 1 - k <= min(e["versions"]) and max(e["versions"]) <= e["step"] - 1, e
    prompts = [p for e in trained for p in e["prompts"]]
    assert len(prompts) == len(set(prompts)) == steps * per_step  # each drawn prompt trained once
    metrics = agent_metrics_of(tmp_path, 1)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1)) and all(m["staleness/max"] <= k for m in metrics)
    records = read_jsonl(tmp_path / "out" / "trajectories.jsonl")
    assert [r["step"] for r in records] == [s for s in range(1, steps + 1) for _ in range(2)]
    assert all(len(r["rewards"]) == r["turns"] for r in records)
