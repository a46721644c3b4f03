"""Synthetic arithmetic problems: `a+b=` / `a-b=` prompts with a numeric `answer` column.

Train and test are disjoint (no (a, op, b) triple in both). Written as JSONL in TRL's
prompt format, plus `completion` for SFT.

`answer` is always right: it is what the verifiable reward checks. `completion` is a
demonstration, and demonstrations are imperfect: with --teacher-slip p, the teacher that wrote
them forgets the carry (or the borrow) with probability p on the problems that need one, as a
student who learned the digits but not the carry would. SFT imitates the slips; a reward that
checks the answer does not reward them.

    python examples/arithmetic/make_data.py [--out examples/arithmetic/data] [--train 2000] [--test 200] [--teacher-slip 0.5]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path


def operands(prompt: str) -> tuple[int, str, int]:
    """(a, op, b) of a prompt "a+b=" or "a-b="."""
    a, op, b = re.match(r"(\d+)([+-])(\d+)=", prompt).groups()
    return int(a), op, int(b)


def needs_carry(a: int, op: str, b: int) -> bool:
    """Whether the ones digit carries into (or borrows from) the tens."""
    return a % 10 + b % 10 >= 10 if op == "+" else a % 10 < b % 10


def slipped(a: int, op: str, b: int) -> int:
    """The answer computed digit by digit with the carry (borrow) forgotten."""
    ones = (a % 10 + b % 10) % 10 if op == "+" else (a % 10 - b % 10) % 10
    tens = a // 10 + b // 10 if op == "+" else a // 10 - b // 10
    return tens * 10 + ones


def problems(seed: int, max_operand: int, teacher_slip: float = 0.0) -> list[dict]:
    rng = random.Random(seed)
    triples = [(a, op, b) for a in range(max_operand + 1) for b in range(max_operand + 1) for op in "+-" if op == "+" or a >= b]
    rng.shuffle(triples)
    rows = []
    for a, op, b in triples:
        answer = a + b if op == "+" else a - b
        shown = slipped(a, op, b) if needs_carry(a, op, b) and rng.random() < teacher_slip else answer
        rows.append({"prompt": f"{a}{op}{b}=", "completion": str(shown), "answer": answer})
    return rows


def write(out: Path, train: int, test: int, seed: int, max_operand: int, teacher_slip: float = 0.0) -> None:
    rows = problems(seed, max_operand, teacher_slip)
    if train + test > len(rows):
        raise SystemExit(f"only {len(rows)} distinct problems with operands up to {max_operand}")
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("test", rows[:test]), ("train", rows[test : test + train])):
        with (out / f"{name}.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "data"))
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-operand", type=int, default=49)
    p.add_argument("--teacher-slip", type=float, default=0.0, help="chance that a demonstration forgets a needed carry or borrow")
    a = p.parse_args()
    if not 0.0 <= a.teacher_slip <= 1.0:
        p.error(f"--teacher-slip is a probability, got {a.teacher_slip}")
    write(Path(a.out), a.train, a.test, a.seed, a.max_operand, a.teacher_slip)
