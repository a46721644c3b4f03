"""Preference data labelled by a hidden rater who likes replies that read easily.

A prompt is a topic, five distinct letters and a colon (`fkmnu:`); a reply is eight letters. The
rater's rule, which no file the trainer reads states: a reply is as good as the fraction of its
letters that are vowels (`hidden_score`). The SFT demonstrations come from a writer who picks every
letter uniformly at random (a fifth of them vowels, on average); each preference pair is two of that
writer's replies to one prompt, the one the rater scores higher chosen (ties are drawn again), with a
`margin` of a quarter per extra vowel.

Files (train and test topics are disjoint):
  sft.jsonl          prompt, completion (the writer's)
  prefs.jsonl        prompt, chosen, rejected, margin: on the SFT prompts
  prefs_test.jsonl   the same on held-out prompts (the reward model's pairwise accuracy)
  prompts.jsonl      prompt only: what PPO samples from
  test.jsonl         held-out prompts: the demo scores replies to them with the hidden rule

    python examples/preference/make_data.py [--out runs/pref/data] [--train 2000] [--test 200]
"""

from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path

TOPIC, REPLY, VOWELS = 5, 8, set("aeiou")


def hidden_score(prompt: str, completion: str) -> float:
    """The rater's rule: the fraction of the reply's first eight characters that are vowels (a reply
    shorter than eight counts its missing letters as consonants)."""
    return sum(c in VOWELS for c in completion[:REPLY]) / REPLY


def writer(prompt: str, rng: random.Random) -> str:
    """The demonstrator: eight letters drawn uniformly, whatever the topic."""
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(REPLY))


def pair(prompt: str, rng: random.Random) -> dict:
    while True:
        a, b = writer(prompt, rng), writer(prompt, rng)
        sa, sb = hidden_score(prompt, a), hidden_score(prompt, b)
        if sa != sb:
            (chosen, sc), (rejected, sr) = sorted([(a, sa), (b, sb)], key=lambda x: -x[1])
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": round((sc - sr) * REPLY / 4, 4)}


def prompts(n: int, rng: random.Random, exclude: set[str] = frozenset()) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        p = "".join(sorted(rng.sample(string.ascii_lowercase, TOPIC))) + ":"
        if p not in exclude and p not in out:
            out.append(p)
    return out


def write(out: Path, train: int, test: int, seed: int) -> None:
    rng = random.Random(seed)
    held_out = prompts(test, rng)
    seen = prompts(train, rng, exclude=set(held_out))
    files = {
        "sft.jsonl": [{"prompt": p, "completion": writer(p, rng)} for p in seen],
        "prefs.jsonl": [pair(p, rng) for p in seen],
        "prefs_test.jsonl": [pair(p, rng) for p in held_out],
        "prompts.jsonl": [{"prompt": p} for p in seen],
        "test.jsonl": [{"prompt": p} for p in held_out],
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        with (out / name).open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/pref/data")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    write(Path(a.out), a.train, a.test, a.seed)
