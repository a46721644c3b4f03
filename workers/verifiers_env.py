"""verifiers (https://github.com/PrimeIntellect-ai/verifiers) 0.4 environments as a job's rollout source,
their own rollout code unmodified, pointed at the policy through the job's chat endpoint.

verifiers 0.4 (`verifiers.v1`) runs an episode as a program (a harness) that talks to an OpenAI-compatible
endpoint: `Env.run_slot` starts the harness in a runtime, its model calls go through verifiers' own
interception server, which relays them (`EvalClient`) to the `base_url` it is given, here the job's
`ChatEndpoint` on 127.0.0.1 (workers/chat_endpoint.py); then the task's `@reward`s score the trace.
The endpoint records every call with its token ids and sampling log-probs, keyed by the rollout's
trace id (verifiers' `X-Session-ID` header), so each episode becomes one `Trajectory`: the first
call's prompt, then each completion (mask 1) and whatever the next call's prompt adds (mask 0), with
the trace's reward (the sum of its weighted rewards) as its return.

What is fixed here (not taken from a job's spec):
- the taskset, by a name of `VERIFIERS_TASKSETS` (the operator's list), never an import path;
- the harness: `null`, verifiers' tool-less chat loop (no code runs on the host; `bash` would run the
  model's commands in a host subprocess, so it is not offered);
- the runtime: `subprocess` on this machine (verifiers' default, `prime`, is a hosted sandbox).

verifiers prepares a harness's program with `uv sync --script`, which downloads its dependencies from
PyPI (and installs uv itself with pip if it is missing). The null harness's program needs openai, mcp,
httpx, httpx2, tenacity and certifi: verifiers' own requirements, so the job's Python already has them;
`_use_this_python` registers this interpreter for the program (verifiers caches the interpreter per
script path), so nothing is downloaded and it runs offline. The program's code is verifiers' own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import hashlib
import importlib
import sys
import types
from typing import TYPE_CHECKING, Any, ClassVar

import verifiers.v1 as vf
from verifiers.v1.utils.score import verify_boxed_math_answer

from orchestrator.core.environments import AssistantTurn, Message, StepResult
from workers.agent_rollout import AgentConfig, Trajectory

if TYPE_CHECKING:
    from workers.chat_endpoint import ChatCall, ChatEndpoint


# ---------------------------------------------------------------------------- a taskset in verifiers' own API

class BoxedMathData(vf.TaskData):
    answer: str | int | float = ""


class BoxedMathTask(vf.Task[BoxedMathData]):
    """A math question from the job's data row (`prompt`, `answer`), scored as verifiers' math
    environments score: the reply's last `\\boxed{}` against the answer with math-verify
    (`verifiers.v1.utils.score.verify_boxed_math_answer`)."""

    @vf.reward(weight=1.0)
    async def correct(self, trace: vf.Trace) -> float:
        return verify_boxed_math_answer(trace.last_reply, str(self.data.answer))


class BoxedMathConfig(vf.TasksetConfig):
    system: str = "Put the final answer in \\boxed{}."
    """The system prompt of every task."""


class BoxedMathTaskset(vf.Taskset[BoxedMathTask, BoxedMathConfig]):
    """Tasks built from data rows (`VerifiersEnv` builds one per row; `load` has none of its own)."""

    def load(self) -> list[BoxedMathTask]:
        return []

    def task(self, row: dict[str, Any]) -> BoxedMathTask:
        return BoxedMathTask(BoxedMathData(prompt=str(row["prompt"]), answer=row.get("answer", ""),
                                           system_prompt=self.config.system or None), self.config.task)


# The operator's list: name -> a Taskset class (`module:Class`) or the id of an installed verifiers
# environment package (`vf-install`ed); a job names one by `kwargs.taskset`.
VERIFIERS_TASKSETS: dict[str, str] = {
    "boxed_math": "workers.verifiers_env:BoxedMathTaskset",
}


def taskset_id(name: str) -> str:
    """The verifiers taskset id of a listed name. verifiers loads a taskset by importing a top-level
    module that exports it in `__all__`; a class of ours is registered under `rlhf_vf_<name>`."""
    if name not in VERIFIERS_TASKSETS:
        raise ValueError(f"verifiers environment: unknown taskset {name!r} (kwargs.taskset); "
                         f"listed: {', '.join(sorted(VERIFIERS_TASKSETS))}")
    target = VERIFIERS_TASKSETS[name]
    if ":" not in target:
        return target
    module, _, cls = target.partition(":")
    alias = f"rlhf_vf_{name}"
    if alias not in sys.modules:
        shim = types.ModuleType(alias)
        setattr(shim, cls, getattr(importlib.import_module(module), cls))
        shim.__all__ = [cls]
        sys.modules[alias] = shim
    return alias


def _use_this_python() -> None:
    """Run the null harness's program with this interpreter instead of a venv that uv downloads."""
    from verifiers.v1.harnesses.utils.launch import CHAT_PROGRAM_SOURCE
    from verifiers.v1.runtimes.subprocess import SubprocessRuntime

    # As `Runtime.prepare_uv_script` names it: the program's content-addressed path in the scripts dir.
    path = f"{SubprocessRuntime.scripts_dir}/{hashlib.sha256(CHAT_PROGRAM_SOURCE.encode()).hexdigest()}.py"
    if SubprocessRuntime._interpreters.get(path) != sys.executable:
        from pathlib import Path

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(CHAT_PROGRAM_SOURCE)
        SubprocessRuntime._interpreters[path] = sys.executable


# ---------------------------------------------------------------------------- the environment

# The envs a job may name (`kwargs.env`): name -> verifiers env id ("" is the taskset's own, SingleAgentEnv).
VERIFIERS_ENVS: dict[str, str] = {
    "single_agent": "",
    "user_sim": "user-sim",  # a modeled user (the same policy, its tokens not trained) talks with the assistant: multi-turn
}


class VerifiersEnv:
    """A verifiers environment (a listed env over a listed taskset, every seat on the null harness)
    whose episodes run through `rollout`, not step by step: `AgentSampler` hands it the job's chat
    endpoint. Only these kwargs reach verifiers' configs: its taskset and task configs also take file
    paths (`system_prompt`) and import paths (plugged rewards), which a REST tenant must not name."""

    tools: ClassVar[list[dict[str, Any]]] = []
    owns_rollout: ClassVar[bool] = True  # AgentSampler calls `rollout` instead of driving `reset`/`step`

    def __init__(self, taskset: str = "boxed_math", env: str = "single_agent", system: str | None = None,
                 persona: str | None = None, timeout_s: float = 600.0):
        if env not in VERIFIERS_ENVS:
            raise ValueError(f"verifiers environment: unknown env {env!r} (kwargs.env); listed: {', '.join(sorted(VERIFIERS_ENVS))}")
        self.taskset: dict[str, Any] = {"id": taskset_id(taskset)}  # (a name not listed fails here, naming kwargs.taskset)
        if system is not None:
            self.taskset["system"] = system
        self.env_id, self.env_kwargs = VERIFIERS_ENVS[env], {}
        if persona is not None:
            if env != "user_sim":
                raise ValueError("verifiers environment: kwargs.persona is for env user_sim only")
            self.env_kwargs["persona"] = persona
        self.timeout = timeout_s
        self.env = self.verifiers_env(max_turns=None)  # validates the configs now

    def verifiers_env(self, max_turns: int | None) -> vf.Env:
        """The env, its every seat on the null harness in a local subprocess, with `max_turns` each."""
        from verifiers.v1.utils.generic import concrete_type
        from verifiers.v1.utils.loaders import environment_class

        cls = environment_class(self.taskset["id"], self.env_id)
        config_cls = concrete_type(cls, vf.EnvConfig, origin=vf.Env) or vf.EnvConfig
        seat = {"harness": {"id": "null"}, "runtime": {"type": "subprocess"}, "max_turns": max_turns}
        seats = {name: dict(seat) for name, f in config_cls.model_fields.items() if isinstance(f.default, vf.AgentConfig)}
        return cls(config_cls.model_validate({"id": self.env_id, "taskset": self.taskset, **self.env_kwargs, **seats}))

    def reset(self, row: dict[str, Any]) -> list[Message]:
        raise TypeError("a verifiers environment runs its own loop: AgentSampler calls rollout()")

    def step(self, turn: AssistantTurn) -> StepResult:
        raise TypeError("a verifiers environment runs its own loop: AgentSampler calls rollout()")

    def task(self, row: dict[str, Any]) -> vf.Task:
        """The row's task: built from its columns (a taskset with `task(row)`), else the taskset's
        own task number `index`."""
        if hasattr(self.env.taskset, "task"):
            return self.env.taskset.task(row)
        return next(t for i, t in enumerate(self.env.taskset) if i == int(row.get("index", 0)))

    def rollout(self, endpoint: ChatEndpoint, rows: list[dict[str, Any]], config: AgentConfig,
                greedy: bool = False) -> list[Trajectory]:
        """One episode per row, all at once, through verifiers' `run_slot`; each as a Trajectory."""
        _use_this_python()
        env = self.verifiers_env(config.max_turns)
        sampling = vf.Sampling(max_tokens=config.max_new_tokens, temperature=0.0 if greedy else config.temperature)
        ctx = vf.ModelContext(model="policy", client=vf.EvalClientConfig(base_url=endpoint.base_url, api_key_var="RLHF_VF_UNUSED"),
                              sampling=sampling)
        tasks = [self.task(row) for row in rows]
        endpoint.take_calls()

        async def run_all() -> list[vf.Episode]:
            async with env.serving():
                return await asyncio.gather(*(env.run_slot(slot, ctx) for t in tasks for slot in env.slots(t, 1)))

        # verifiers is asyncio: its loop runs on a thread of its own (a caller inside a loop works too), with a deadline.
        with cf.ThreadPoolExecutor(1, thread_name_prefix="verifiers") as pool:
            episodes = pool.submit(asyncio.run, run_all()).result(timeout=self.timeout)
        calls = endpoint.take_calls()
        return share_openings([self.trajectory(ep, calls) for ep in episodes], rows)

    def trajectory(self, episode: vf.Episode, calls: list[ChatCall]) -> Trajectory:
        """The trainable seat's calls as one trajectory (`stitch`), its messages as verifiers recorded
        them (its trace's final branch) and its return the trace's reward (the sum of its weighted
        rewards). Other seats' calls (user_sim's modeled user) are not trained on."""
        trainable = [t for t in episode.traces if t.agent.trainable]
        if len(trainable) != 1:
            raise RuntimeError(f"verifiers episode with {len(trainable)} trainable traces; one per episode is supported")
        [trace] = trainable
        mine = [c for c in calls if c.session == trace.id]
        if not mine:
            why = "; ".join(f"{e.type}: {e.message}" for e in [*episode.errors, *trace.errors]) or "no model call reached the endpoint"
            raise RuntimeError(f"verifiers episode of task {episode.task.key[:12]} made no model call: {why[-2000:]}")
        from verifiers.v1.dialects.chat import message_to_wire

        traj = stitch(mine, env=self)
        traj.messages = [{**wire, "content": wire.get("content") or ""} for wire in map(message_to_wire, trace.messages)]
        traj.rewards = [0.0] * (traj.turns - 1) + [trace.reward]
        traj.tool_errors = len(trace.errors)
        return traj


def stitch(calls: list[ChatCall], env: Any = None) -> Trajectory:
    """One session's calls as one token sequence: the first call's prompt, then each call's completion
    (mask 1, its sampling log-probs) after whatever its prompt adds to what came before (mask 0). A call
    whose prompt does not extend what came before (a harness that rewrote its history) ends it there,
    truncated: its tokens were not generated after that history, so they are not trained on."""
    first = calls[0]
    traj = Trajectory(ids=list(first.prompt_ids), prompt_len=len(first.prompt_ids),
                      messages=[*first.messages, {"role": "assistant", "content": first.text}], text=first.prompt_text, env=env)
    for call in calls:
        if call.prompt_ids[: len(traj.ids)] != traj.ids:
            traj.truncated = True
            break
        appended = call.prompt_ids[len(traj.ids):]
        traj.ids += appended + call.completion_ids
        traj.mask += [0] * len(appended) + [1] * len(call.completion_ids)
        traj.logprobs += [0.0] * len(appended) + list(call.logprobs)
        traj.turns += 1
        traj.messages = [*call.messages, {"role": "assistant", "content": call.text}]
    traj.done = True
    return traj


def share_openings(trajs: list[Trajectory], rows: list[dict[str, Any]]) -> list[Trajectory]:
    """Episodes of one prompt (adjacent equal rows) as `to_batch` takes them: one opening, their
    longest common prefix; the rest of each one's first prompt moves to its response, masked (user_sim's
    modeled user opens each episode with its own words)."""
    start = 0
    while start < len(trajs):
        end = start + 1
        while end < len(trajs) and rows[end] == rows[start]:
            end += 1
        group = trajs[start:end]
        common = min(t.prompt_len for t in group)
        for t in group[1:]:
            common = next((i for i in range(common) if t.ids[i] != group[0].ids[i]), common)
        for t in group:
            moved = t.prompt_len - common
            t.prompt_len, t.mask, t.logprobs = common, [0] * moved + t.mask, [0.0] * moved + t.logprobs
        start = end
    return trajs
