"""Environments for multi-turn agents: the interface, tool calls in the Hermes/Qwen format, and the table
of environments by name (a REST spec names one; never an import path).

An environment turns a data row into the opening messages (`reset`), then each model turn into
observation messages, a reward and whether the episode is over (`step`). The rollout
(workers/agent_rollout.py) renders those messages with the model's chat template and appends their
tokens, masked out of the loss. Pure: this floor imports nothing of the project; environments that
need a sandbox or a library live in workers/environments.py and are named here by import path.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

Message = dict[str, Any]  # {"role": "system" | "user" | "assistant" | "tool", "content": str, ...}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass
class AssistantTurn:
    """What the model said in one turn: its text (stop token excluded) and the tool calls parsed from it."""

    text: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_calls: int = 0  # <tool_call> blocks that were not a JSON object with a "name" (and "arguments" object)


@dataclass
class StepResult:
    observation: list[Message]  # appended to the conversation (tool results, a user's reply); empty when done
    reward: float = 0.0  # this turn's reward; the episode's return is the sum over its turns
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # counters the rollout sums: tool_errors, sandbox_s, ...


@runtime_checkable
class Environment(Protocol):
    """One episode at a time; the rollout makes one instance per trajectory (`make_environment`)."""

    tools: list[dict[str, Any]]  # JSON-schema tool specs, passed to the chat template as `tools=`

    def reset(self, row: dict[str, Any]) -> list[Message]:
        """The opening messages for a data row."""

    def step(self, turn: AssistantTurn) -> StepResult:
        """The environment's answer to one model turn."""


# ---------------------------------------------------------------------------- tool calls

# Hermes / Qwen2.5 / Qwen3 chat templates: each call is a JSON object between these tags.
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[list[ToolCall], int]:
    """(the valid calls in `text`, the number of invalid ones). An unclosed <tool_call> counts as invalid."""
    calls, invalid = [], 0
    for body in _TOOL_CALL.findall(text):
        try:
            obj = json.loads(body)
        except ValueError:
            invalid += 1
            continue
        args = obj.get("arguments", {}) if isinstance(obj, dict) else None
        if isinstance(args, str):  # some models emit the arguments as a JSON string
            try:
                args = json.loads(args)
            except ValueError:
                args = None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(args, dict):
            invalid += 1
            continue
        calls.append(ToolCall(obj["name"], args))
    invalid += text.count("<tool_call>") - len(_TOOL_CALL.findall(text))
    return calls, invalid


def format_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """A call as a model trained on the Hermes format writes it (for scripted turns and tests)."""
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def tool_spec(name: str, description: str, parameters: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": {"type": "object", "properties": parameters, "required": required}}}


# ---------------------------------------------------------------------------- a calculator

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.USub: operator.neg,
        ast.UAdd: operator.pos}
_MAX_POW, _MAX_DIGITS = 64, 400


def calculate(expression: str) -> int | float:
    """Arithmetic on numbers (+ - * / // % **, parentheses), evaluated from its syntax tree; no names, no
    calls. Exponents past 64 and results past 400 digits are refused, so a call cannot eat the CPU."""
    def ev(node: ast.AST):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > _MAX_POW:
                raise ValueError(f"exponent {right} is too large")
            out = _OPS[type(node.op)](left, right)
            if isinstance(out, int) and abs(out).bit_length() > _MAX_DIGITS * 3.33:
                raise ValueError("result too large")
            return out
        raise ValueError(f"unsupported expression: {ast.dump(node)[:60]}")

    if len(expression) > 500:
        raise ValueError("expression too long")
    return ev(ast.parse(expression.strip(), mode="eval"))


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


class ToolEnvironment:
    """Tools by name, an answer checked against the row's `answer` column. A turn with tool calls gets
    one tool message per call; a turn without any is the final answer (reward 1.0 if its last number
    equals `answer`, else 0.0), which ends the episode. Subclasses fill `tools` and `call`."""

    system = ("You can call tools. To call one, write <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>. "
              "When you know the answer, reply with the number alone.")
    tools: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, system: str | None = None):
        if system is not None:  # (a short one keeps a tiny model's episodes short: `rlhf demo tools`)
            self.system = system

    def reset(self, row: dict[str, Any]) -> list[Message]:
        self.answer = row.get("answer")
        return [{"role": "system", "content": self.system}, {"role": "user", "content": str(row["prompt"])}]

    def call(self, name: str, arguments: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """(the tool's output, info counters); raises for a call the tool refuses."""
        raise NotImplementedError

    def step(self, turn: AssistantTurn) -> StepResult:
        if not turn.tool_calls and not turn.invalid_calls:
            got, want = last_number(turn.text), last_number(str(self.answer))
            ok = got is not None and want is not None and abs(got - want) <= 1e-6
            return StepResult([], reward=1.0 if ok else 0.0, done=True)
        names = {t["function"]["name"] for t in self.tools}
        obs, info = [], {"tool_errors": 0}
        for call in turn.tool_calls:
            if call.name not in names:
                content, info["tool_errors"] = f"error: no tool named {call.name!r}", info["tool_errors"] + 1
            else:
                try:
                    content, more = self.call(call.name, call.arguments)
                    for k, v in more.items():
                        info[k] = info.get(k, 0) + v
                except Exception as err:  # noqa: BLE001 - a tool's failure is the model's observation
                    content, info["tool_errors"] = f"error: {type(err).__name__}: {err}", info["tool_errors"] + 1
            obs.append({"role": "tool", "name": call.name, "content": content})
        if turn.invalid_calls:
            obs.append({"role": "tool", "content": f"error: {turn.invalid_calls} tool call(s) were not valid JSON "
                                                   "objects with a name and arguments"})
        return StepResult(obs, info=info)


class CalculatorEnv(ToolEnvironment):
    """Multi-digit arithmetic with a `calculator` tool (pure Python, no sandbox needed)."""

    tools: ClassVar[list[dict[str, Any]]] = [tool_spec("calculator", "Evaluate an arithmetic expression, e.g. 1234 * 5678.",
                       {"expression": {"type": "string"}}, ["expression"])]

    def call(self, name: str, arguments: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return str(calculate(str(arguments.get("expression", "")))), {}


# ---------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class EnvironmentEntry:
    name: str
    cls: str  # import path `module:Class`, resolved by `make_environment`'s caller (the floor imports nothing)
    description: str
    needs: str = ""  # an optional package it imports (the extra to install), empty if none
    sandbox: bool = False  # it runs code: its constructor takes `sandbox=` (a SandboxPool), and a job starts sandbox actors
    kwargs: tuple[str, ...] | None = None  # the keyword arguments a spec may give (rollout.agent.kwargs); None: any
    chat_endpoint: bool = False  # it runs its own agent on the job's chat endpoint, which serves the transformers model


ENVIRONMENTS: dict[str, EnvironmentEntry] = {
    e.name: e
    for e in (
        EnvironmentEntry("calculator", "orchestrator.core.environments:CalculatorEnv",
                         "multi-digit arithmetic; tool: calculator; reward 1 for the right final number", kwargs=("system",)),
        EnvironmentEntry("python_calculator", "workers.environments:PythonToolEnv",
                         "the same task with a `python` tool run in the sandbox (workers/sandbox.py)", sandbox=True, kwargs=()),
        EnvironmentEntry("reasoning_gym", "workers.environments:ReasoningGymEnv",
                         "any reasoning-gym task (row column `task`, or kwargs), unmodified: its question, "
                         "its own score_answer on the final turn", needs="reasoning-gym"),
        EnvironmentEntry("verifiers", "workers.verifiers_env:VerifiersEnv",
                         "a verifiers 0.4 environment (kwargs.taskset: a name of workers/verifiers_env.py's "
                         "VERIFIERS_TASKSETS), its own rollout loop, harness and rewards, unmodified, on the job's "
                         "OpenAI-compatible chat endpoint", needs="verifiers",
                         kwargs=("taskset", "env", "system", "persona", "timeout_s"), chat_endpoint=True),
    )
}


IMPORT_PATH = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$"  # `pkg.module:Class` (trusted entrypoints only)


def environment_path(name: str) -> str:
    """The import path of a built-in environment, or `name` itself if it is an import path (the trusted
    entrypoints may name one; REST never passes one through); a ValueError that lists the names otherwise."""
    if ":" in name and re.match(IMPORT_PATH, name):
        return name
    if name not in ENVIRONMENTS:
        raise ValueError(f"unknown environment {name!r}; built in: {', '.join(sorted(ENVIRONMENTS))}")
    return ENVIRONMENTS[name].cls
