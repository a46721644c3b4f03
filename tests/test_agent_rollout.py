"""Multi-turn rollouts on the tiny model: token in, token out; tools for real; a slow tool stalls no one."""

from __future__ import annotations

import threading
from typing import ClassVar

import pytest
import torch

from orchestrator.core.environments import CalculatorEnv, StepResult, format_tool_call
from workers.agent_rollout import (
    AgentConfig,
    AgentRollout,
    HFTurnSampler,
    agent_metrics,
    to_batch,
)
from workers.common import response_logprobs


@pytest.fixture(scope="module")
def lm(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), tok


class Scripted:
    """A policy that says given texts, turn by turn, with the model's own log-probs of their tokens."""

    def __init__(self, model, tok, turns: list[str]):
        self.model, self.tok, self.turns = model, tok, turns
        self.stop_ids = [tok.convert_tokens_to_ids("<|im_end|>")]

    @torch.no_grad()
    def __call__(self, contexts, budgets):
        out = []
        for ctx, budget in zip(contexts, budgets):
            k = self.tok.decode(ctx).count("<|im_start|>assistant") - 1
            ids = self.tok.encode(self.turns[k] + "<|im_end|>", add_special_tokens=False)[:budget]
            logits = self.model(torch.tensor([ctx + ids])).logits[0, len(ctx) - 1 : -1]
            out.append((ids, torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids)[:, None])[:, 0].tolist()))
        return out


class Talk:
    """An environment that answers every turn with a user message, for `turns` turns."""

    tools: ClassVar[list] = []

    def __init__(self, turns: int = 3):
        self.left = turns

    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, turn):
        self.left -= 1
        return StepResult([{"role": "user", "content": f"go on ({self.left})"}], reward=0.5, done=self.left == 0)


def mask_runs(traj) -> list[tuple[int, list[int]]]:
    """A trajectory's response as runs of equal loss mask: [(mask, ids), ...] (generated turns are 1, observations 0)."""
    runs, cur, prev = [], [], None
    for x, m in zip(traj.response_ids, traj.mask):
        if m != prev and cur:
            runs.append((prev, cur))
            cur = []
        cur, prev = cur + [x], m
    runs.append((prev, cur))
    return runs


def check_token_identity(model, tok, trajs, generated_parts=None, atol: float = 1e-5):
    batch = to_batch(trajs, tok.pad_token_id)
    recomputed, _ = response_logprobs(model, batch)
    for i, t in enumerate(trajs):
        r = len(t.response_ids)
        assert batch.responses[i, :r].tolist() == t.response_ids
        assert batch.response_mask[i, :r].tolist() == [float(m) for m in t.mask]
        gen = [x for x, m in zip(t.response_ids, t.mask) if m]
        assert len(gen) == sum(t.mask) and len(t.logprobs) == r
    mask = batch.response_mask.bool()
    assert torch.allclose(recomputed[mask], batch.logprobs[mask], atol=atol), (recomputed[mask] - batch.logprobs[mask]).abs().max()
    return batch


def test_tool_path_scripted(lm):
    model, tok = lm
    script = ["Let me compute. " + format_tool_call("calculator", {"expression": "1234 * 5678"}),
              format_tool_call("calculator", {"expression": "__import__('os')"}) + "<tool_call>{bad</tool_call>",
              "7006652"]
    rollout = AgentRollout(tok, Scripted(model, tok, script), AgentConfig(max_turns=4, max_tokens=2000, max_new_tokens=200))
    [t] = rollout.run([CalculatorEnv()], [{"prompt": "What is 1234 * 5678?", "answer": 7006652}])
    assert (t.turns, t.tool_calls, t.invalid_calls, t.tool_errors, t.reward, t.truncated) == (3, 2, 1, 1, 1.0, False)
    assert [m["role"] for m in t.messages] == ["system", "user", "assistant", "tool", "assistant", "tool", "tool", "assistant"]
    assert t.messages[3]["content"] == "7006652"
    # token identity: ids = the opening + (generated turn + appended observation)*, exactly
    opening = tok.encode(rollout.render(t.messages[:2], CalculatorEnv.tools), add_special_tokens=False)
    assert t.ids[: t.prompt_len] == opening
    gen_runs, obs_runs, cur, cur_mask = [], [], [], None
    for x, m in zip(t.response_ids, t.mask):
        if m != cur_mask and cur:
            (gen_runs if cur_mask else obs_runs).append(cur)
            cur = []
        cur, cur_mask = cur + [x], m
    (gen_runs if cur_mask else obs_runs).append(cur)
    assert [tok.decode(g) for g in gen_runs] == [s + "<|im_end|>" for s in script]
    assert tok.decode(obs_runs[0]) == "\n<|im_start|>tool\n7006652<|im_end|>\n<|im_start|>assistant\n"
    # what the template renders for the whole conversation is what was trained on, token for token
    full = tok.apply_chat_template(t.messages, tools=CalculatorEnv.tools, tokenize=False)
    assert tok.decode(t.ids) + "\n" == full
    check_token_identity(model, tok, [t])
    assert agent_metrics([t])["agent/tool_calls"] == 2.0


def test_sampled_turns_token_in_token_out(lm):
    model, tok = lm
    torch.manual_seed(0)
    rollout = AgentRollout(tok, HFTurnSampler(model, tok, temperature=1.0), AgentConfig(max_turns=3, max_tokens=120, max_new_tokens=6))
    trajs = rollout.run([Talk(3) for _ in range(4)], [{"prompt": f"{i}+{i}="} for i in range(4)])
    assert all(t.turns == 3 for t in trajs) and all(t.reward == 1.5 for t in trajs)
    for t in trajs:
        assert len(t.ids) <= 120 and sum(t.mask) <= 3 * 6 and 0 < sum(t.mask) < len(t.mask)
    batch = check_token_identity(model, tok, trajs)
    assert batch.response_mask.sum() == sum(sum(t.mask) for t in trajs)
    # a budget too small for a third turn truncates the episode
    short = AgentRollout(tok, HFTurnSampler(model, tok), AgentConfig(max_turns=3, max_tokens=40, max_new_tokens=6))
    [t] = short.run([Talk(3)], [{"prompt": "hello there"}])
    assert t.truncated and len(t.ids) <= 40 and agent_metrics([t])["agent/truncated"] == 1.0
    # a budget the opening alone fills is an error naming the field, not episodes with nothing to train on
    with pytest.raises(ValueError, match=r"rollout.agent.max_tokens=8 leaves no room to answer: the episode's opening .* is \d+ tokens"):
        AgentRollout(tok, HFTurnSampler(model, tok), AgentConfig(max_turns=3, max_tokens=8, max_new_tokens=6)).run([Talk(3)], [{"prompt": "hello there"}])


def test_a_slow_tool_stalls_only_its_trajectory(lm):
    model, tok = lm
    others_done = threading.Event()
    finished, lock = [], threading.Lock()

    class Slow(Talk):
        def __init__(self, slow: bool):
            super().__init__(3)
            self.slow = slow

        def step(self, turn):
            if self.slow and self.left == 3:
                # bounded: if the rollout waited for this step before running the others' turns, this times out
                self.saw_others = others_done.wait(timeout=30)
            res = super().step(turn)
            if res.done and not self.slow:
                with lock:
                    finished.append(1)
                    if len(finished) == 3:
                        others_done.set()
            return res

    envs = [Slow(True), Slow(False), Slow(False), Slow(False)]
    rollout = AgentRollout(tok, HFTurnSampler(model, tok), AgentConfig(max_turns=3, max_tokens=200, max_new_tokens=4))
    trajs = rollout.run(envs, [{"prompt": "x"}] * 4)
    assert envs[0].saw_others and all(t.turns == 3 for t in trajs)


# Qwen2.5's template, shortened: tools in the system turn; consecutive tool results grouped in one user
# turn as <tool_response> blocks (whether a turn closes depends on the next message).
QWEN_STYLE = (
    "{% if tools %}<|im_start|>system\n{{ messages[0]['content'] if messages[0]['role'] == 'system' else '' }}\n\n# Tools\n<tools>"
    "{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% if not tools %}<|im_start|>system\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% elif m['role'] == 'tool' %}"
    "{% if loop.index0 == 0 or messages[loop.index0 - 1]['role'] != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\\n<tool_response>\\n' + m['content'] + '\\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_tools_reach_the_prompt_and_grouped_tool_turns_append(tiny_model, lm):
    from transformers import AutoTokenizer

    model, _ = lm
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = QWEN_STYLE
    two_calls = format_tool_call("calculator", {"expression": "2 + 2"}) + format_tool_call("calculator", {"expression": "3 * 3"})
    rollout = AgentRollout(tok, Scripted(model, tok, [two_calls, "13"]), AgentConfig(max_tokens=3000, max_new_tokens=300))
    [t] = rollout.run([CalculatorEnv()], [{"prompt": "2 + 2 + 3 * 3?", "answer": 13}])
    prompt = tok.decode(t.ids[: t.prompt_len])
    assert '"name": "calculator"' in prompt and "<tools>" in prompt
    assert (t.turns, t.tool_calls, t.reward) == (2, 2, 1.0)
    obs = tok.decode([x for x, m in zip(t.response_ids, t.mask) if not m])
    assert obs == ("\n<|im_start|>user\n<tool_response>\n4\n</tool_response>\n<tool_response>\n9\n</tool_response><|im_end|>\n"
                   "<|im_start|>assistant\n")
    assert tok.decode(t.ids) + "\n" == tok.apply_chat_template(t.messages, tools=CalculatorEnv.tools, tokenize=False)
    check_token_identity(model, tok, [t])
