"""Data for `rlhf demo tools`: multi-digit multiplication that a tiny model cannot do in its head but can with
the `calculator` tool (orchestrator/core/environments.py CalculatorEnv).

- `sft.jsonl`: tool-call traces (`messages`) from a teacher that calls the calculator
  `1 - teacher_guess` of the time (`rlhf demo tools`: always); otherwise it answers at once with a guess
  that has the right leading digits and wrong last ones. Each trace is a new problem: with a few thousand
  seen many times, the tiny model learned those problems' digits instead of copying (held-out 0%).
- `prompts.jsonl`: GRPO's problems (`prompt`, `answer`), rewarded only for the right final number.
- `test.jsonl`: held-out problems, none in the other two files.

    python examples/tools/make_data.py --out runs/tools/data
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEM = "Use the calculator."  # the environment's system message (kwargs.system in pipeline.yaml): short, for a tiny model


def problem(rng: random.Random) -> dict:
    """a*b: a of 3 digits, b of 2, their product of 5. Fixed widths put every digit that is copied (into
    the call, and from the tool's result into the answer) at a fixed distance from where it is written,
    which a 2-layer model learns in a few hundred steps; it does not learn to multiply in its head."""
    while True:
        a, b = rng.randint(100, 999), rng.randint(10, 99)
        if 10000 <= a * b <= 99999:
            return {"prompt": f"{a}*{b}", "answer": a * b}


def guess(answer: int, rng: random.Random) -> int:
    """The teacher's mental arithmetic: the leading digits right, the last two wrong."""
    return answer - answer % 100 + (answer % 100 + rng.randint(1, 99)) % 100


def trace(row: dict, rng: random.Random, teacher_guess: float) -> list[dict]:
    """One demonstration: the opening (as the environment gives it), then a calculator call, its result and
    the answer; or, `teacher_guess` of the time, a guess at once."""
    from orchestrator.core.environments import format_tool_call

    opening = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": row["prompt"]}]
    if rng.random() < teacher_guess:
        return [*opening, {"role": "assistant", "content": str(guess(row["answer"], rng))}]
    call = format_tool_call("calculator", {"expression": row["prompt"]})
    return [*opening, {"role": "assistant", "content": call}, {"role": "tool", "name": "calculator", "content": str(row["answer"])},
            {"role": "assistant", "content": str(row["answer"])}]


def write(out: Path, sft: int, prompts: int, test: int, seed: int = 0, teacher_guess: float = 0.4) -> None:
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < sft + prompts + test:
        row = problem(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    files = {"sft.jsonl": [{"messages": trace(r, rng, teacher_guess)} for r in rows[:sft]],
             "prompts.jsonl": rows[sft : sft + prompts], "test.jsonl": rows[sft + prompts :]}
    for name, items in files.items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in items))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/tools/data")
    p.add_argument("--sft", type=int, default=12800)
    p.add_argument("--prompts", type=int, default=2000)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-guess", type=float, default=0.0)
    a = p.parse_args()
    write(Path(a.out), a.sft, a.prompts, a.test, a.seed, a.teacher_guess)
