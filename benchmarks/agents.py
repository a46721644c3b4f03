"""What agents cost here: one sandbox call (bubblewrap, limits, Python's start) alone and 4 at once, and
multi-turn episodes on the tiny model. Prints numbers; asserts nothing.

    python benchmarks/agents.py
"""

from __future__ import annotations

import concurrent.futures as cf
import statistics
import tempfile
import time
from typing import ClassVar

from workers.sandbox import Sandbox, unit_test_reward


def sandbox_numbers(calls: int = 20) -> None:
    box = Sandbox()
    print(f"sandbox: bwrap={box.bwrap is not None}, properties off: {[k for k, v in box.properties().items() if not v]}")
    walls = []
    for _ in range(calls):
        start = time.perf_counter()
        box.run("print(sum(range(1000)))")
        walls.append(time.perf_counter() - start)
    print(f"  one call: median {statistics.median(walls) * 1e3:.0f} ms, max {max(walls) * 1e3:.0f} ms ({calls} calls)")
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: box.run("print(1)"), range(calls)))
    print(f"  4 threads: {calls / (time.perf_counter() - start):.1f} calls/s")
    start = time.perf_counter()
    unit_test_reward(box, "def f(x): return x + 1", [f"assert f({i}) == {i + 1}" for i in range(10)])
    print(f"  unit_test_reward, 10 tests: {(time.perf_counter() - start) * 1e3:.0f} ms")


def rollout_numbers(episodes: int = 16) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.core.environments import StepResult
    from orchestrator.entrypoints.tiny_model import init_model
    from workers.agent_rollout import AgentConfig, AgentRollout, HFTurnSampler

    class Talk:
        tools: ClassVar[list] = []

        def __init__(self):
            self.left = 3

        def reset(self, row):
            return [{"role": "user", "content": row["prompt"]}]

        def step(self, turn):
            self.left -= 1
            return StepResult([{"role": "user", "content": "go on"}], done=self.left == 0)

    with tempfile.TemporaryDirectory() as d:
        path = init_model(d)
        model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
        rollout = AgentRollout(tok, HFTurnSampler(model, tok), AgentConfig(max_turns=3, max_tokens=256, max_new_tokens=16))
        start = time.perf_counter()
        trajs = rollout.run([Talk() for _ in range(episodes)], [{"prompt": f"{i}"} for i in range(episodes)])
        wall = time.perf_counter() - start
    gen = sum(sum(t.mask) for t in trajs)
    print(f"rollout: {episodes} episodes x 3 turns on the tiny model: {wall:.2f} s, {gen / wall:.0f} generated tokens/s, "
          f"{sum(len(t.mask) - sum(t.mask) for t in trajs)} observation tokens")


if __name__ == "__main__":
    sandbox_numbers()
    rollout_numbers()
