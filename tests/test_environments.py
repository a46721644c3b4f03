"""The environment interface, tool-call parsing, the built-in table and the reasoning-gym adapter."""

from __future__ import annotations

import pytest

from orchestrator.core.environments import (
    ENVIRONMENTS,
    AssistantTurn,
    CalculatorEnv,
    Environment,
    calculate,
    environment_path,
    format_tool_call,
    parse_tool_calls,
)


def test_parse_tool_calls_hermes_format():
    text = ("Let me compute. " + format_tool_call("calculator", {"expression": "12*34"})
            + '<tool_call>{"name": "python", "arguments": "{\\"code\\": \\"print(1)\\"}"}</tool_call>'
            + "<tool_call>not json</tool_call><tool_call>{\"arguments\": {}}</tool_call><tool_call>{\"name\": 1")
    calls, invalid = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in calls] == [("calculator", {"expression": "12*34"}), ("python", {"code": "print(1)"})]
    assert invalid == 3  # bad JSON, no name, unclosed
    assert parse_tool_calls("42") == ([], 0)


def test_calculator_is_arithmetic_only():
    assert calculate("123456 * 654321") == 123456 * 654321
    assert calculate("(7 - 2) ** 3 // 4 % 7") == (5 ** 3 // 4) % 7
    for bad in ["__import__('os')", "9 ** 9 ** 9", "x + 1", "[1] * 3", "1" * 600]:
        with pytest.raises((ValueError, SyntaxError)):
            calculate(bad)


def test_calculator_env_episode():
    env = CalculatorEnv()
    assert isinstance(env, Environment)
    msgs = env.reset({"prompt": "What is 1234 * 5678?", "answer": 1234 * 5678})
    assert [m["role"] for m in msgs] == ["system", "user"]
    calls, invalid = parse_tool_calls(format_tool_call("calculator", {"expression": "1234 * 5678"}) + "<tool_call>{</tool_call>"
                                      + format_tool_call("search", {"q": "x"}))
    res = env.step(AssistantTurn("...", calls, invalid))
    assert not res.done and res.reward == 0.0
    assert [m["content"] for m in res.observation] == [
        "7006652", "error: no tool named 'search'", "error: 1 tool call(s) were not valid JSON objects with a name and arguments"]
    assert res.info["tool_errors"] == 1
    bad = env.step(AssistantTurn("", parse_tool_calls(format_tool_call("calculator", {"expression": "open('x')"}))[0]))
    assert bad.observation[0]["content"].startswith("error: ValueError") and bad.info["tool_errors"] == 1
    final = env.step(AssistantTurn("The answer is 7006652"))
    assert final.done and final.reward == 1.0
    assert env.step(AssistantTurn("7006653")).reward == 0.0


def test_table_names_import_paths():
    assert {"calculator", "python_calculator", "reasoning_gym"} <= set(ENVIRONMENTS)
    assert environment_path("calculator") == "orchestrator.core.environments:CalculatorEnv"
    with pytest.raises(ValueError, match="unknown environment 'nope'; built in: calculator"):
        environment_path("nope")


def test_python_tool_env_runs_in_the_sandbox():
    from workers.environments import make_environment

    env = make_environment("python_calculator")
    env.reset({"prompt": "2**100?", "answer": 2 ** 100})
    calls, _ = parse_tool_calls(format_tool_call("python", {"code": "print(2 ** 100)"})
                                + format_tool_call("python", {"code": "open('/etc/shadow').read()"}))
    res = env.step(AssistantTurn("", calls))
    assert res.observation[0]["content"] == str(2 ** 100)
    assert "FileNotFoundError" in res.observation[1]["content"] or "PermissionError" in res.observation[1]["content"]
    assert res.info["sandbox_s"] > 0


@pytest.mark.slow  # importing reasoning_gym takes 5.6 s here
def test_reasoning_gym_adapter_runs_its_tasks_unmodified():
    pytest.importorskip("reasoning_gym")
    import reasoning_gym

    from workers.environments import make_environment

    env = make_environment("reasoning_gym", task="basic_arithmetic", size=10, seed=3)
    msgs = env.reset({"index": 2})
    entry = reasoning_gym.create_dataset("basic_arithmetic", size=10, seed=3)[2]
    assert msgs == [{"role": "user", "content": entry["question"]}]
    assert env.step(AssistantTurn(f" {entry['answer']}\n")).reward == 1.0
    res = env.step(AssistantTurn("no idea"))
    assert res.done and res.reward == 0.0
