"""Compare two runs' metrics.jsonl, every value but the clock's: the same steps, the same keys, the
same numbers (exactly; NaN equals NaN). Timing and throughput keys are left out: they measure the machine.

    python scripts/compare_metrics.py BEFORE/metrics.jsonl AFTER/metrics.jsonl

Prints how many values it compared and each difference; exits 1 if there is one.
"""

from __future__ import annotations

import json
import math
import sys

CLOCK = ("timing/", "throughput/", "time", "wall")  # key prefixes that measure the machine, not the run


def rows(path: str) -> dict[int, dict]:
    with open(path) as f:
        return {r["step"]: r for r in map(json.loads, f) if "step" in r}


def same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def compare(before: dict[int, dict], after: dict[int, dict]) -> tuple[int, list[str]]:
    compared, diffs = 0, []
    if before.keys() != after.keys():
        diffs.append(f"steps differ: {sorted(before)} vs {sorted(after)}")
    for step in sorted(before.keys() & after.keys()):
        a, b = before[step], after[step]
        keys = {k for k in a.keys() | b.keys() if not k.startswith(CLOCK)}
        for k in sorted(keys):
            if k not in a or k not in b:
                diffs.append(f"step {step}: {k} only in {'after' if k in b else 'before'}")
            elif not same(a[k], b[k]):
                diffs.append(f"step {step}: {k} {a[k]!r} -> {b[k]!r}")
            compared += 1
    return compared, diffs


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    compared, diffs = compare(rows(argv[0]), rows(argv[1]))
    print(f"{compared} values compared over {len(rows(argv[0]))} steps, {len(diffs)} differ")
    for d in diffs:
        print("  " + d)
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
