"""Environments that need more than the floor: the `python` tool in the sandbox, and an adapter that runs
reasoning-gym's tasks unmodified. `make_environment` builds any entry of orchestrator/core/environments.py's
table by name."""

from __future__ import annotations

import importlib
import time
from typing import Any, ClassVar

from orchestrator.core.environments import (
    AssistantTurn,
    Environment,
    Message,
    StepResult,
    ToolEnvironment,
    environment_path,
    tool_spec,
)
from workers.sandbox import Limits, Sandbox, SandboxPool, run_python


def make_environment(name: str, **kwargs: Any) -> Environment:
    """A fresh instance of the built-in environment `name` (one per trajectory)."""
    module, _, cls = environment_path(name).partition(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)


class PythonToolEnv(ToolEnvironment):
    """The calculator task with a `python` tool: the code runs in a sandbox (a plain `Sandbox`, or a
    `SandboxPool` of Ray actors shared by every trajectory), and its output is the tool message."""

    tools: ClassVar[list[dict[str, Any]]] = [tool_spec("python", "Run Python code (standard library only) and see what it prints.",
                       {"code": {"type": "string"}}, ["code"])]

    def __init__(self, sandbox: Sandbox | SandboxPool | None = None, limits: Limits | None = None):
        self.sandbox = sandbox or Sandbox(limits or Limits(cpu_s=2, wall_s=5))

    def call(self, name: str, arguments: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        start = time.perf_counter()
        out = run_python(self.sandbox, str(arguments.get("code", "")))
        return out, {"sandbox_s": time.perf_counter() - start}


class ReasoningGymEnv:
    """A reasoning-gym task (https://github.com/open-thought/reasoning-gym), its dataset and scorer
    unmodified: the row names the task (`task`, and `seed`/`index` for which entry; or `question`,
    `answer` and `metadata` as the dataset wrote them), the opening message is the entry's question,
    and the first turn is the answer, scored by the dataset's own `score_answer` (0.0 to 1.0).
    Single-turn: reasoning-gym has no tools."""

    tools: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, task: str | None = None, size: int = 1000, seed: int = 0, **task_kwargs: Any):
        self.task, self.size, self.seed, self.task_kwargs = task, size, seed, task_kwargs

    def reset(self, row: dict[str, Any]) -> list[Message]:
        import reasoning_gym

        task = row.get("task", self.task)
        if not task:
            raise ValueError("reasoning_gym environment: name a task (row column `task` or the `task` kwarg)")
        self.dataset = reasoning_gym.create_dataset(task, size=self.size, seed=int(row.get("seed", self.seed)), **self.task_kwargs)
        self.entry = row if "question" in row and "metadata" in row else self.dataset[int(row.get("index", 0)) % self.size]
        return [{"role": "user", "content": self.entry["question"]}]

    def step(self, turn: AssistantTurn) -> StepResult:
        score = self.dataset.score_answer(answer=turn.text.strip(), entry=self.entry)
        return StepResult([], reward=float(score or 0.0), done=True)
