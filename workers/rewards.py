"""Built-in reward functions for verifiable tasks.

Each follows TRL's signature: `fn(prompts, completions, **columns) -> list[float]`, where
`columns` holds the data row's other columns, one value per completion. A spec names them by the
names in orchestrator/core/algorithms.py BUILTIN_REWARDS, which holds their import paths.
"""

from __future__ import annotations

import re
from typing import Any

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _last_number(text: str) -> float | None:
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def _first_number(text: str) -> float | None:
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[0]) if found else None


def accuracy(prompts: list[str], completions: list[str], answer: list[Any] | None = None, position: str = "first",
             tolerance: float = 1e-6, **_: Any) -> list[float]:
    """1.0 when the completion's number equals the row's `answer` column, else 0.0.

    `position` picks the completion's `first` or `last` number.
    """
    if answer is None:
        raise ValueError("accuracy reward needs an 'answer' column in the data")
    pick = _first_number if position == "first" else _last_number
    out = []
    for completion, expected in zip(completions, answer):
        got, want = pick(completion), _last_number(str(expected))
        out.append(1.0 if got is not None and want is not None and abs(got - want) <= tolerance else 0.0)
    return out


def regex_match(prompts: list[str], completions: list[str], pattern: str = r".+", full: bool = False, **_: Any) -> list[float]:
    """1.0 when the completion matches `pattern` (from its start; the whole of it with full=True)."""
    rx = re.compile(pattern, re.DOTALL)
    match = rx.fullmatch if full else rx.match
    return [1.0 if match(c) else 0.0 for c in completions]


def length_penalty(prompts: list[str], completions: list[str], target: int = 0, scale: float = 0.01, **_: Any) -> list[float]:
    """-scale * max(0, len(completion) - target), in characters."""
    return [-scale * max(0, len(c) - target) for c in completions]
