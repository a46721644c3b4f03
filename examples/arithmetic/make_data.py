"""Synthetic arithmetic problems: `a+b=` / `a-b=` prompts with a numeric `answer` column.

Train and test are disjoint (no (a, op, b) triple in both). Written as JSONL in TRL's
prompt format, plus `completion` for SFT.

    python examples/arithmetic/make_data.py [--out examples/arithmetic/data] [--train 2000] [--test 200]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def problems(seed: int, max_operand: int) -> list[dict]:
    rng = random.Random(seed)
    triples = [(a, op, b) for a in range(max_operand + 1) for b in range(max_operand + 1) for op in "+-" if op == "+" or a >= b]
    rng.shuffle(triples)
    rows = []
    for a, op, b in triples:
        answer = a + b if op == "+" else a - b
        rows.append({"prompt": f"{a}{op}{b}=", "completion": str(answer), "answer": answer})
    return rows


def write(out: Path, train: int, test: int, seed: int, max_operand: int) -> None:
    rows = problems(seed, max_operand)
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
    a = p.parse_args()
    write(Path(a.out), a.train, a.test, a.seed, a.max_operand)
