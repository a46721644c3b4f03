"""`rlhf plot RUN_DIR`: reward, KL, held-out accuracy and response length against step, as a PNG.

Reads only `<run_dir>/metrics.jsonl`, so it works on a finished job and on one still running.
Stages of a pipeline are marked by vertical lines and named at the top.
"""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (
    ("reward", ("reward/mean",)),
    ("KL to reference", ("kl",)),
    # Held-out rewards of greedy completions; a reward model's and DPO's pairwise accuracy.
    ("held-out eval", ("eval/*/mean", "eval/accuracy", "eval/rewards/accuracies")),
    ("loss (SFT, RM, DPO)", ("loss",)),
    ("entropy (nats/token)", ("entropy",)),
    ("response length (tokens)", ("response_length/mean",)),
)
SMOOTH_ABOVE = 60  # points: longer series are drawn faint, under their running mean


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics in {run_dir}: {path} does not exist")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written by a running job
            continue
    return rows


def summary(run_dir: str | Path, metric: str = "reward/mean", window: int = 5) -> str | None:
    """One line: `metric`'s mean over the first and the last `window` steps (single steps are noisy),
    or None when the run logged no such metric (an SFT-only job, say)."""
    steps, values = _series(read_metrics(run_dir), metric).get(metric, ([], []))
    if not values:
        return None
    window = max(1, min(window, len(values) // 2 or 1))
    first, last = sum(values[:window]) / window, sum(values[-window:]) / window
    return (f"{metric}: {first:.3f} -> {last:.3f} (mean of the first and the last {window} of {len(values)} steps; "
            f"steps {steps[0]}-{steps[-1]})")


def _series(rows: list[dict], pattern: str) -> dict[str, tuple[list[int], list[float]]]:
    """name -> (steps, values) for each metric matching `pattern` (one `*` allowed)."""
    head, star, tail = pattern.partition("*")
    names = sorted({k for r in rows for k in r if (k.startswith(head) and k.endswith(tail) if star else k == pattern)})
    if star:
        # The eval panel shows each reward's accuracy; the weighted sum only when it is all there is.
        names = [n for n in names if n != "eval/response_length/mean"]
        names = [n for n in names if n != "eval/reward/mean" or len(names) == 1]
    out = {}
    for name in names:
        points = [(r["step"], r[name]) for r in rows if isinstance(r.get(name), (int, float))]
        if points:
            out[name] = ([s for s, _ in points], [v for _, v in points])
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the PNG (default `<run_dir>/metrics.png`) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    out = Path(out) if out else run_dir / "metrics.png"
    fig, axes = plt.subplots(2, 3, figsize=(15, 7), sharex=True)
    for ax, (title, patterns) in zip(axes.flat, PANELS):
        for pattern in patterns:
            for name, (steps, values) in _series(rows, pattern).items():
                if len(steps) <= SMOOTH_ABOVE:
                    ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=name)
                    continue
                window = max(len(steps) // 40, 5)
                line = ax.plot(steps, values, alpha=0.25, linewidth=0.8)[0]
                ax.plot(steps, running_mean(values, window), color=line.get_color(), label=f"{name} (mean of {window})")
        _mark_stages(ax, rows)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle(f"{run_dir.name}: {len(rows)} steps")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last `window` values at each point (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _mark_stages(ax, rows: list[dict]) -> None:
    previous = None
    for r in rows:
        stage = r.get("stage")
        if stage is not None and stage != previous:
            ax.axvline(r["step"] - 0.5, color="grey", linestyle="--", linewidth=0.8)
            ax.annotate(stage, (r["step"], 1), xycoords=("data", "axes fraction"), xytext=(2, -10),
                        textcoords="offset points", fontsize=8, color="grey")
        previous = stage
