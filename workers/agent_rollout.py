"""Multi-turn rollouts: a model talks with an environment, calls tools, and what it is trained on is exactly
what it generated plus what was appended for it (token in, token out).

Per turn, the trajectories that are ready (not waiting for a tool) are generated as one batch; each
one's turn is parsed for Hermes/Qwen `<tool_call>` blocks and handed to its environment on a thread
pool, and the next batch starts with whichever trajectories have their observations back, so a
slow tool holds up only its own trajectory. Generated ids are never re-tokenized: the observation's
ids are the chat template's text after everything so far, tokenized alone, and carry loss mask 0.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from orchestrator.core.batch import Batch, build_batch
from orchestrator.core.environments import (
    ENVIRONMENTS,
    AssistantTurn,
    Environment,
    Message,
    parse_tool_calls,
)
from orchestrator.core.seeds import step_seed
from workers.turn_sampler import HFTurnSampler

if TYPE_CHECKING:
    from orchestrator.core.spec import AgentSpec


@dataclass
class Trajectory:
    """One episode. `ids[:prompt_len]` is the rendered opening; after it, each token is either generated
    (mask 1, its sampling log-prob) or appended for an observation or the template (mask 0, log-prob 0)."""

    ids: list[int]
    prompt_len: int
    messages: list[Message]
    text: str  # the decoded text of `ids`, which the chat template's rendering must extend
    env: Environment
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0
    invalid_calls: int = 0
    tool_errors: int = 0
    sandbox_s: float = 0.0
    done: bool = False
    truncated: bool = False

    @property
    def reward(self) -> float:
        return sum(self.rewards)

    @property
    def response_ids(self) -> list[int]:
        return self.ids[self.prompt_len :]

    def summary(self) -> dict[str, Any]:
        """What the driver reports of an episode (metrics, the run directory's trajectories.jsonl) and what
        reward functions score: its messages, per-turn rewards and counters, plain JSON."""
        final = next((m["content"] for m in reversed(self.messages) if m.get("role") == "assistant"), "")
        return {"messages": self.messages, "rewards": self.rewards, "reward": self.reward, "final": final, "turns": self.turns,
                "tool_calls": self.tool_calls, "invalid_calls": self.invalid_calls, "tool_errors": self.tool_errors,
                "sandbox_s": self.sandbox_s, "truncated": self.truncated, "tokens": len(self.ids),
                # what was trained on, to check against `messages` (tests/test_agent_job.py): ids, loss mask, sampling log-probs
                "prompt_len": self.prompt_len, "ids": self.ids, "mask": self.mask, "logprobs": self.logprobs}


@dataclass
class AgentConfig:
    max_turns: int = 4  # model turns per episode
    max_tokens: int = 512  # the whole trajectory: prompt, generated and appended tokens
    max_new_tokens: int = 64  # per turn
    temperature: float = 1.0
    tool_threads: int = 8  # environment steps run at once


class AgentRollout:
    """Runs episodes of environments with a turn sampler (`HFTurnSampler`, or any callable of the same
    shape: a scripted policy in tests, a vLLM engine later)."""

    def __init__(self, tokenizer, sample: Callable[[list[list[int]], list[int]], list[tuple[list[int], list[float]]]],
                 config: AgentConfig | None = None):
        self.tok, self.sample, self.cfg = tokenizer, sample, config or AgentConfig()

    def render(self, messages: list[Message], tools: list[dict[str, Any]]) -> str:
        return self.tok.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, tokenize=False)

    def start(self, env: Environment, row: dict[str, Any]) -> Trajectory:
        messages = env.reset(row)
        text = self.render(messages, env.tools)
        ids = self.tok.encode(text, add_special_tokens=False)
        return Trajectory(ids=list(ids), prompt_len=len(ids), messages=messages, text=text, env=env)

    def run(self, envs: list[Environment], rows: list[dict[str, Any]]) -> list[Trajectory]:
        trajs = [self.start(env, row) for env, row in zip(envs, rows)]
        for t in trajs:  # (an episode that cannot generate a token would train on nothing, silently)
            if len(t.ids) >= self.cfg.max_tokens:
                raise ValueError(f"rollout.agent.max_tokens={self.cfg.max_tokens} leaves no room to answer: the episode's opening "
                                 f"(the environment's first messages in the chat template) is {len(t.ids)} tokens alone")
        ready = [t for t in trajs if not self._out_of_budget(t)]
        pending: dict[cf.Future, tuple[Trajectory, AssistantTurn]] = {}
        with cf.ThreadPoolExecutor(self.cfg.tool_threads) as pool:
            while ready or pending:
                if ready:
                    for traj, turn in self._generate(ready):
                        pending[pool.submit(traj.env.step, turn)] = (traj, turn)
                    ready = []
                done, _ = cf.wait(list(pending), timeout=600, return_when=cf.FIRST_COMPLETED)
                if not done:
                    raise TimeoutError("no environment step finished in 600 s")
                for fut in done:
                    traj, turn = pending.pop(fut)
                    if self._observe(traj, turn, fut.result()):
                        ready.append(traj)
        return trajs

    def _out_of_budget(self, traj: Trajectory) -> bool:
        if len(traj.ids) >= self.cfg.max_tokens:
            traj.done = traj.truncated = True
        return traj.done

    def _generate(self, trajs: list[Trajectory]) -> list[tuple[Trajectory, AssistantTurn]]:
        budgets = [min(self.cfg.max_new_tokens, self.cfg.max_tokens - len(t.ids)) for t in trajs]
        out = []
        for traj, (ids, logprobs) in zip(trajs, self.sample([t.ids for t in trajs], budgets)):
            traj.ids += ids
            traj.mask += [1] * len(ids)
            traj.logprobs += logprobs
            traj.turns += 1
            text = self.tok.decode(ids, skip_special_tokens=False)
            traj.text += text
            content = self.tok.decode([i for i in ids if i not in self._stops()], skip_special_tokens=False)
            calls, invalid = parse_tool_calls(content)
            traj.tool_calls += len(calls)
            traj.invalid_calls += invalid
            traj.messages.append({"role": "assistant", "content": content})
            out.append((traj, AssistantTurn(content, calls, invalid)))
        return out

    def _stops(self) -> set[int]:
        return set(getattr(self.sample, "stop_ids", None) or [self.tok.eos_token_id])

    def _observe(self, traj: Trajectory, turn: AssistantTurn, res) -> bool:
        """Record a step's result; append its observation's tokens. True if the trajectory goes on."""
        traj.rewards.append(float(res.reward))
        traj.tool_errors += int(res.info.get("tool_errors", 0))
        traj.sandbox_s += float(res.info.get("sandbox_s", 0.0))
        if res.done:
            traj.done = True
            return False
        if traj.turns >= self.cfg.max_turns:
            traj.done = traj.truncated = True
            return False
        traj.messages += res.observation
        full = self.render(traj.messages, traj.env.tools)
        if not full.startswith(traj.text):
            # The template rewrote an earlier turn (or the turn ended without its end-of-turn token):
            # append what follows the last rendering of this turn's content.
            cut = full.rfind(turn.text) + len(turn.text) if turn.text and turn.text in full else len(full)
            suffix = full[cut:]
        else:
            suffix = full[len(traj.text):]
        obs_ids = self.tok.encode(suffix, add_special_tokens=False)
        if len(traj.ids) + len(obs_ids) >= self.cfg.max_tokens:
            traj.done = traj.truncated = True
            return False
        traj.ids += obs_ids
        traj.mask += [0] * len(obs_ids)
        traj.logprobs += [0.0] * len(obs_ids)
        traj.text += suffix
        return True


def to_batch(trajs: list[Trajectory], pad_id: int, n: int = 1, extras: list[dict[str, Any]] | None = None) -> Batch:
    """The trajectories as the one batch contract: response = everything after the opening, response_mask
    = the loss mask (generated tokens only), logprobs = the sampling log-probs. Trajectories of one
    prompt must be adjacent, `n` each, and share the opening. Each prompt's extras (its data columns,
    given or empty) get `episodes`: its trajectories' summaries, in row order (`episodes_of_rows`)."""
    width = max(len(t.response_ids) for t in trajs)
    responses = torch.full((len(trajs), width), pad_id, dtype=torch.long)
    valid, mask, logprobs = (torch.zeros(len(trajs), width) for _ in range(3))
    for i, t in enumerate(trajs):
        r = len(t.response_ids)
        responses[i, :r] = torch.tensor(t.response_ids)
        valid[i, :r] = 1
        mask[i, :r] = torch.tensor(t.mask, dtype=torch.float)
        logprobs[i, :r] = torch.tensor(t.logprobs)
    prompts = [trajs[i].ids[: trajs[i].prompt_len] for i in range(0, len(trajs), n)]
    columns = extras or [{} for _ in prompts]
    extras = [{**columns[g], "episodes": [t.summary() for t in trajs[g * n : (g + 1) * n]]} for g in range(len(prompts))]
    return build_batch(prompts, responses, valid, pad_id, n, response_mask=mask, logprobs=logprobs, extras=extras)


def episodes_of_rows(batch: Batch) -> list[dict[str, Any]] | None:
    """Each row's episode summary (`Trajectory.summary`), from its prompt's extras (rows of a prompt are
    adjacent, in order); None for a batch of single-turn completions."""
    if not batch.extras or "episodes" not in batch.extras[0]:
        return None
    seen: dict[int, int] = {}
    out = []
    for g in batch.group_ids.tolist():
        out.append(batch.extras[g]["episodes"][seen.get(g, 0)])
        seen[g] = seen.get(g, 0) + 1
    return out


def agent_metrics(episodes: list[Trajectory] | list[dict[str, Any]]) -> dict[str, float]:
    """Per-step metrics of a batch of episodes (`Trajectory`s or their summaries): means per episode,
    except the counts' totals."""
    eps = [e.summary() if isinstance(e, Trajectory) else e for e in episodes]
    k = max(1, len(eps))
    return {
        "agent/turns_per_episode": sum(e["turns"] for e in eps) / k,
        "agent/tool_calls": float(sum(e["tool_calls"] for e in eps)),
        "agent/tool_errors": float(sum(e["tool_errors"] for e in eps)),
        "agent/invalid_calls": float(sum(e["invalid_calls"] for e in eps)),
        "agent/sandbox_s": sum(e["sandbox_s"] for e in eps),
        "agent/truncated": sum(e["truncated"] for e in eps) / k,
        "agent/reward_mean": sum(e["reward"] for e in eps) / k,
        "agent/tokens_per_episode": sum(e["tokens"] for e in eps) / k,
    }


class AgentSampler:
    """The rollout phase of a multi-turn job (the plan's `rollout_mode` multi_turn), with `HFSampler`'s
    `generate` (workers/rollout.py), so the trainer or a rollout actor runs it where it would sample
    single completions: each of the `n` samples of a prompt is an episode of `agent.environment`,
    opened by the prompt's data row, whose return is in its extras (`episodes`: the reward worker adds
    it to the job's rewards). Seeded by (seed, step), as HFSampler."""

    def __init__(self, tokenizer, n: int, agent: AgentSpec, max_new_tokens: int, temperature: float, seed: int):
        self.tok, self.n, self.agent, self.temperature, self.seed = tokenizer, n, agent, temperature, seed
        self.config = AgentConfig(max_turns=agent.max_turns, max_tokens=agent.max_tokens, max_new_tokens=max_new_tokens,
                                  temperature=temperature)
        self.sandbox = None
        self._endpoint = None

    def attach_sandbox(self, actors: list) -> None:
        """Run the environments' code on the job's sandbox actors (the plan's `sandbox` role)."""
        from workers.sandbox import SandboxPool

        self.sandbox = SandboxPool.of(actors)

    def chat_endpoint(self, model):
        """The job's OpenAI-compatible endpoint over `model` (workers/chat_endpoint.py), started once."""
        from workers.chat_endpoint import ChatEndpoint

        if self._endpoint is None:
            self._endpoint = ChatEndpoint(model, self.tok, self.config.max_new_tokens, self.temperature)
        self._endpoint.model = model
        return self._endpoint

    def environments(self, count: int) -> list[Environment]:
        from workers.environments import make_environment

        entry = ENVIRONMENTS.get(self.agent.environment)
        kwargs = dict(self.agent.kwargs)
        if self.sandbox is not None and (entry is None or entry.sandbox):  # (an import path gets the pool if the job has one)
            kwargs["sandbox"] = self.sandbox
        return [make_environment(self.agent.environment, **kwargs) for _ in range(count)]

    def generate(self, model, device, prompt_ids: list[list[int]], extras: list[dict[str, Any]], step: int,
                 greedy: bool = False, with_logprobs: bool = True) -> tuple[Batch, float]:
        """(the step's episodes as one Batch, the seconds spent), each turn sampled by transformers' `generate`
        on `model`. `prompt_ids` are unused: the environment's opening messages, rendered with the chat template
        and its tools, are each episode's prompt."""
        torch.manual_seed(step_seed(self.seed, step))
        return self.episodes(HFTurnSampler(model, self.tok, self.temperature, greedy=greedy), extras, greedy, model)

    def episodes(self, sample: Callable[[list[list[int]], list[int]], list[tuple[list[int], list[float]]]], extras: list[dict[str, Any]],
                 greedy: bool = False, model=None) -> tuple[Batch, float]:
        """`n` episodes per data row of `extras` (1 if greedy), each turn sampled by `sample` (a turn sampler of
        workers/turn_sampler.py); an agent on an OpenAI client talks to the chat endpoint over `model` instead."""
        start = time.perf_counter()
        n = 1 if greedy else self.n
        rows = [{"prompt": e.get("prompt_text"), **e} for e in extras for _ in range(n)]
        env = self.environments(1)[0]
        if getattr(env, "owns_rollout", False):  # an agent on an OpenAI client (workers/verifiers_env.py)
            if model is None:
                raise ValueError(f"{self.agent.environment} runs its own agent on the job's chat endpoint, which serves a "
                                 "transformers model: use rollout.backend hf")
            trajs = env.rollout(self.chat_endpoint(model), rows, self.config, greedy=greedy)
        else:
            trajs = AgentRollout(self.tok, sample, self.config).run([env, *self.environments(len(rows) - 1)], rows)
        return to_batch(trajs, self.tok.pad_token_id, n, extras), time.perf_counter() - start
