"""Training curves from WORKDIR/metrics.jsonl: reward, entropy, KL and response length against
the training step, with reference resets marked as vertical lines (label: their trigger).

    python -m prorl_jax.plot WORKDIR [--out WORKDIR/curves.png]

metrics.jsonl holds one JSON object per line, each with `step`; training lines carry
`reward/mean`, `entropy`, `kl`, `response_length/mean`, `reference_resets` (count so far) and, on
a step where the reference was reset, `reset/trigger`; validation lines may carry
`val/<domain>/pass@1` (drawn on the reward panel). Needs matplotlib (the `plot` extra).
"""
from __future__ import annotations

import argparse
import json
import math
import os

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
# (metric key, panel title)
PANELS = (
    ("reward/mean", "reward (mean)"),
    ("entropy", "entropy (nats/token)"),
    ("kl", "KL to reference"),
    ("response_length/mean", "response length (tokens)"),
)


class MetricsError(ValueError):
    """metrics.jsonl missing or malformed (the message names the file and line)."""


def read_metrics(path: str) -> list[dict]:
    """The metrics lines of `path` (a metrics.jsonl file or a workdir holding one), in order.
    Blank lines are skipped; a truncated last line (a run killed mid-write) is ignored."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if not os.path.exists(path):
        raise MetricsError(f"{path}: metrics file not found")
    with open(path) as f:
        lines = f.read().split("\n")
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):  # last line, no newline after it: a partial write
                break
            raise MetricsError(f"{path} line {i}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
            raise MetricsError(f"{path} line {i}: expected a JSON object with a numeric 'step'")
        rows.append(row)
    return rows


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that carry a finite number under `key`."""
    steps, values = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            steps.append(r["step"])
            values.append(float(v))
    return steps, values


def resets(rows: list[dict]) -> list[tuple[float, str]]:
    """(step, trigger) of every reference reset recorded in the rows."""
    return [(r["step"], str(r["reset/trigger"])) for r in rows if r.get("reset/trigger")]


def _new_figure(num_panels: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = 2
    rows = (num_panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    return plt, fig, axes.ravel()


def plot_curves(rows: list[dict], out_path: str, title: str = "") -> str:
    """Draws the four panels (and validation pass@1 on the reward panel) to `out_path` (PNG)."""
    if not rows:
        raise MetricsError(f"no metrics lines to plot for {out_path}")
    val_keys = sorted({k for r in rows for k in r if k.startswith("val/") and k.endswith("/pass@1")})
    plt, fig, axes = _new_figure(len(PANELS))
    reset_marks = resets(rows)
    for ax, (key, label) in zip(axes, PANELS):
        steps, values = series(rows, key)
        ax.plot(steps, values, lw=1.2, label=key)
        if key == "reward/mean":
            for vk in val_keys:
                ax.plot(*series(rows, vk), "o--", ms=3, lw=1, label=vk)
        for j, (step, trigger) in enumerate(reset_marks):
            ax.axvline(step, color="tab:red", ls=":", lw=1,
                       label="reference reset" if j == 0 else None)
            if ax is axes[0]:
                ax.annotate(trigger, (step, 1.0), xycoords=("data", "axes fraction"),
                            rotation=90, va="top", ha="right", fontsize=7, color="tab:red")
        ax.set_title(label if steps else f"{label}: no data")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax is axes[0]:
            ax.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Draws WORKDIR/metrics.jsonl to a PNG.")
    parser.add_argument("workdir")
    parser.add_argument("--out", default=None, help=f"default WORKDIR/{CURVES_FILE}")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.workdir, CURVES_FILE)
    rows = read_metrics(args.workdir)
    plot_curves(rows, out, title=os.path.basename(os.path.normpath(args.workdir)))
    print(f"wrote {out} ({len(rows)} metrics lines, {len(resets(rows))} resets)")


if __name__ == "__main__":
    main()
