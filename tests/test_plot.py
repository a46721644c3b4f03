"""`rlhf train`'s closing line: the reward's mean over the first and the last steps, by hand."""

from __future__ import annotations

import json

from orchestrator.reporting.plot import summary


def test_summary_averages_the_first_and_last_steps(tmp_path):
    rows = [{"step": s, "reward/mean": r} for s, r in enumerate([0.0, 0.1, 0.2, 0.5, 0.6, 0.7, 0.8, 1.0, 1.0, 0.9, 1.1, 1.0], 1)]
    rows.insert(3, {"step": 4, "loss": 1.0})  # a row without the metric (an SFT stage's) is skipped
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = summary(tmp_path)
    # first 5: (0 + .1 + .2 + .5 + .6) / 5 = 0.28; last 5: (1 + 1 + .9 + 1.1 + 1) / 5 = 1.0
    assert line.startswith("reward/mean: 0.280 -> 1.000 (mean of the first and the last 5 of 12 steps; steps 1-12)"), line


def test_a_short_run_compares_halves_and_a_run_without_rewards_says_nothing(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward/mean": r}) + "\n" for s, r in ((1, 0.0), (2, 0.5), (3, 1.0))))
    assert summary(tmp_path).startswith("reward/mean: 0.000 -> 1.000 (mean of the first and the last 1 of 3 steps")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    assert summary(tmp_path) is None
