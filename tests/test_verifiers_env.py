"""verifiers 0.4 environments as a rollout source (workers/verifiers_env.py): verifiers' own episode code
(SingleAgentEnv, the null harness's chat program, its interception server, the task's rewards) runs
against the job's chat endpoint on the tiny model, and what is trained on is what the model generated,
token for token, with the environment's own reward."""

from __future__ import annotations

import hashlib
import json
import sys
import types

import pytest
import torch

from tests.test_agent_rollout import check_token_identity, lm, mask_runs  # noqa: F401 (the tiny model fixture)
from workers.agent_rollout import AgentConfig
from workers.chat_endpoint import ChatEndpoint
from workers.environments import make_environment

# verifiers is imported by the tests that use it, not at collection: importing verifiers.v1 takes 7.4 s here.


@pytest.fixture(scope="module")
def vfe():
    """workers/verifiers_env.py (which imports verifiers.v1)."""
    pytest.importorskip("verifiers.v1")
    import workers.verifiers_env

    return workers.verifiers_env


@pytest.fixture(scope="module")
def endpoint(lm):  # noqa: F811 (the fixture imported above)
    model, tok = lm
    ep = ChatEndpoint(model, tok, max_new_tokens=12)
    yield ep
    ep.close()


def digest_score(reply: str) -> float:
    return int(hashlib.sha256(reply.encode()).hexdigest(), 16) % 1000 / 1000


@pytest.fixture
def digest_taskset(vfe, monkeypatch):
    """A listed taskset `digest`: boxed_math plus a reward that differs from episode to episode (a digest
    of the reply, weight 2), so a reward handed to the wrong trajectory shows."""
    import verifiers.v1 as vf

    class DigestTask(vfe.BoxedMathTask):
        @vf.reward(weight=2.0)
        async def digest(self, trace: vf.Trace) -> float:
            return digest_score(trace.last_reply)

    class DigestTaskset(vf.Taskset[DigestTask, vfe.BoxedMathConfig]):
        def load(self):
            return []

        def task(self, row):
            return DigestTask(vfe.BoxedMathTaskset.task(self, row).data, self.config.task)

    shim = types.ModuleType("rlhf_vf_digest")
    shim.DigestTaskset, shim.__all__ = DigestTaskset, ["DigestTaskset"]
    monkeypatch.setitem(sys.modules, "rlhf_vf_digest", shim)
    monkeypatch.setitem(vfe.VERIFIERS_TASKSETS, "digest", "unused:DigestTaskset")  # (listed; its module is the shim above)


def test_verifiers_episodes_are_trained_on_token_for_token(endpoint, digest_taskset):
    tok, model = endpoint.tok, endpoint.model
    env = make_environment("verifiers", taskset="digest")
    rows = [{"prompt": "3+4=", "answer": 7}, {"prompt": "12*3=", "answer": 36}]
    torch.manual_seed(0)
    trajs = env.rollout(endpoint, rows, AgentConfig(max_turns=2, max_new_tokens=12))
    assert len(trajs) == 2
    for traj, row in zip(trajs, rows):
        # The opening is what verifiers' chat program sent: the task's system prompt and question, rendered by the template.
        opening = [{"role": "system", "content": "Put the final answer in \\boxed{}."}, {"role": "user", "content": row["prompt"]}]
        rendered = tok.apply_chat_template(opening, add_generation_prompt=True, tokenize=False)
        assert traj.ids[: traj.prompt_len] == tok.encode(rendered, add_special_tokens=False)
        # One call (the null harness has no tools): the response is exactly the generated ids, all trained.
        assert traj.turns == 1 and traj.mask == [1] * len(traj.response_ids) and 0 < len(traj.response_ids) <= 12
        # verifiers' trace holds the reply the model wrote; its rewards (math-verify's 0 and the digest, weight 2) are the return.
        [system, user, reply] = traj.messages
        assert (system["role"], user["content"], reply["role"]) == ("system", row["prompt"], "assistant")
        generated = tok.decode(traj.response_ids, skip_special_tokens=False).removesuffix("<|im_end|>")
        assert generated.strip() == (reply.get("content") or "").strip()
        assert traj.reward == pytest.approx(2.0 * digest_score(generated.strip()))
    assert len({t.reward for t in trajs}) == 2
    with torch.no_grad():
        check_token_identity(model, tok, trajs)  # log-probs recomputed from the trained batch equal the sampled ones (1e-5)
    # The program ran on this Python (nothing downloaded by uv).
    from verifiers.v1.runtimes.subprocess import SubprocessRuntime

    assert set(SubprocessRuntime._interpreters.values()) == {sys.executable}


@pytest.mark.slow  # 28-64 s here: each turn of each seat starts verifiers' chat program again (a Python process)
def test_a_multi_turn_verifiers_env_trains_the_assistant_seat_only(vfe, endpoint):
    """verifiers' user_sim env: a modeled user (the same policy, not trainable) opens and answers; the
    assistant's calls stitch into one trajectory per episode whose observations are the user's words,
    masked, and the episodes of one prompt share one opening."""
    tok, model = endpoint.tok, endpoint.model
    env = make_environment("verifiers", env="user_sim", persona="Ask for {scenario} Say {done} when answered.")
    row = {"prompt": "3+4=", "answer": 7}
    torch.manual_seed(0)
    trajs = env.rollout(endpoint, [dict(row), dict(row)], AgentConfig(max_turns=2, max_new_tokens=8))
    assert [t.prompt_len for t in trajs] == [trajs[0].prompt_len] * 2
    assert trajs[0].ids[: trajs[0].prompt_len] == trajs[1].ids[: trajs[1].prompt_len]
    for t in trajs:
        assert t.turns == 2 and not t.truncated  # each assistant call's prompt extended the one before, ids as generated
        roles = [m["role"] for m in t.messages]
        assert roles == ["system", "user", "assistant", "user", "assistant"], roles
        runs = mask_runs(t)
        generated = [tok.decode(ids).removesuffix("<|im_end|>") for m, ids in runs if m]
        assert generated == [m["content"] for m in t.messages if m["role"] == "assistant"]
        # The modeled user's second message (its own generated words) is an observation here: loss mask 0.
        assert t.messages[3]["content"] in tok.decode([x for m, ids in runs if not m for x in ids])
    with torch.no_grad():
        check_token_identity(model, tok, trajs)


def test_a_session_of_calls_is_stitched_with_the_observations_masked(vfe, endpoint):
    """Two calls of one session (an agent's loop: the reply and a tool result go back in the history) make
    one trajectory: the second prompt reuses the first's ids and completion as they were generated."""
    import openai

    tok, model = endpoint.tok, endpoint.model
    client = openai.OpenAI(base_url=endpoint.base_url, api_key="unused", default_headers={"X-Session-ID": "episode-1"})
    endpoint.take_calls()
    messages = [{"role": "user", "content": "12*34"}]
    first = client.chat.completions.create(model="policy", messages=messages, max_tokens=10)
    history = [*messages, {"role": "assistant", "content": first.choices[0].message.content or ""},
               {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"result": 408})}]
    stream = client.chat.completions.create(model="policy", messages=history, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    calls = endpoint.take_calls()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == calls[1].text  # served as SSE
    assert chunks[-1].usage.completion_tokens == len(calls[1].completion_ids)
    assert [c.session for c in calls] == ["episode-1", "episode-1"]
    traj = vfe.stitch(calls)
    first_len = len(calls[0].prompt_ids) + len(calls[0].completion_ids)
    assert traj.turns == 2 and not traj.truncated
    assert traj.ids == calls[1].prompt_ids + calls[1].completion_ids  # the second prompt extends the first call's ids
    assert traj.ids[:first_len] == calls[0].prompt_ids + calls[0].completion_ids
    observation = traj.ids[first_len : len(calls[1].prompt_ids)]
    assert traj.mask == [1] * len(calls[0].completion_ids) + [0] * len(observation) + [1] * len(calls[1].completion_ids)
    assert "408" in tok.decode(observation)
    with torch.no_grad():
        check_token_identity(model, tok, [traj])


def test_a_taskset_not_listed_is_refused_naming_the_kwarg(vfe):
    with pytest.raises(ValueError, match=r"unknown taskset 'pkg.mod:Evil' \(kwargs.taskset\); listed: boxed_math"):
        make_environment("verifiers", taskset="pkg.mod:Evil")
    with pytest.raises(ValueError, match=r"unknown env 'best_of_n' \(kwargs.env\); listed: single_agent, user_sim"):
        make_environment("verifiers", env="best_of_n")
    # verifiers' own config keys are not passed through: its taskset config reads a file named by `system_prompt`
    # and its task config imports plugged reward functions by path.
    for key, value in [("system_prompt", "/etc/passwd"), ("task", {"rewards": {"x": {"fn": "os:system"}}})]:
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{key}'"):
            make_environment("verifiers", **{key: value})
    assert isinstance(make_environment("verifiers"), vfe.VerifiersEnv)


@pytest.mark.slow
def test_a_grpo_job_on_a_verifiers_environment(vfe, ray_head, tiny_model, arith_file, tmp_path):
    """The real entrypoint on the session's Ray: the trainer samples through verifiers (the job's chat
    endpoint in the trainer actor, verifiers' chat program in a subprocess), 2 GRPO steps, `succeeded`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import read_jsonl, tiny_spec
    from tests.test_agent_job import agent_metrics_of, run, trajectory

    spec = tiny_spec(tiny_model, arith_file, tmp_path / "out", rewards=[{"function": "length_penalty", "weight": 0.1}],
                     rollout={"n": 2, "max_new_tokens": 8,
                              "agent": {"environment": "verifiers", "kwargs": {"taskset": "boxed_math"}, "max_tokens": 128}},
                     optim={"steps": 2, "prompts_per_step": 2})
    run(spec, tmp_path, ray_head)
    metrics = agent_metrics_of(tmp_path, 1)
    assert [m["step"] for m in metrics] == [1, 2] and all(m["agent/turns_per_episode"] == 1.0 for m in metrics)
    assert all("rewards/length_penalty/mean" in m for m in metrics)  # the job's reward functions add to the environment's
    records = read_jsonl(tmp_path / "out" / "trajectories.jsonl")
    assert [r["step"] for r in records] == [1, 1, 2, 2]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    for r in records:
        system, user, reply = r["messages"]  # verifiers' trace: the task's system prompt, the row's question, the reply
        assert system["content"] == "Put the final answer in \\boxed{}." and user["content"].endswith("=")
        generated = tok.decode(r["ids"][r["prompt_len"]:]).removesuffix("<|im_end|>").strip()
        assert generated == reply["content"].strip() and r["final"] == reply["content"] and r["reward"] == sum(r["rewards"])
    # Step 1 sampled with the initial weights: the recorded log-probs recompute from the trained batch.
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        check_token_identity(model, tok, [trajectory(r) for r in records if r["step"] == 1])
