"""Runs a grid of config overrides, one training run per point, and compares them.

    python launchers/sweep.py --config=configs/prorl.py:demo \\
        --grid 'loss.eps_high=0.28,0.4' --grid 'loss.beta=0,1e-4' \\
        --workdir=/tmp/sweep [--parallel 2] [--dry-run] [-- --config.total_steps=50]

Each point of the cartesian product runs `PROGRAM --config=CONFIG --workdir=DIR/<name>
--config.<key>=<value>... EXTRA` (PROGRAM defaults to `python -m prorl_jax.main`; `--program`
substitutes another, e.g. for tests), with its output in DIR/<name>/log.txt. Then:
    DIR/summary.md   a table per run: exit code, steps, final and best reward/mean, mean reward
                     over the last tenth of steps, final KL / entropy / response length, resets,
                     best validation pass@1 and the mean off-policy-correction metrics
                     (correction/masked_frac, correction/mismatch_k3), when logged
    DIR/compare.png  reward/mean and KL against step, one line per run
    DIR/sweep.json   the runs: name, overrides, command, exit code
Values are split on commas, so a grid value cannot itself contain a comma.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from prorl_jax.plot import MetricsError, read_metrics, series  # noqa: E402

DEFAULT_PROGRAM = f"{shlex.quote(sys.executable)} -m prorl_jax.main"
CORRECTION_KEYS = ("correction/masked_frac", "correction/mismatch_k3")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    """['loss.beta=0,1e-4', ...] -> [('loss.beta', ['0', '1e-4']), ...] (order kept)."""
    grid, seen = [], set()
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not _KEY_RE.match(key):
            raise ValueError(f"--grid {spec!r}: expected 'dotted.config.key=v1,v2,...'")
        vals = [v.strip() for v in values.split(",")]
        if not vals or any(not v for v in vals):
            raise ValueError(f"--grid {spec!r}: expected non-empty comma-separated values")
        if key in seen:
            raise ValueError(f"--grid {spec!r}: key {key!r} given twice")
        seen.add(key)
        grid.append((key, vals))
    return grid


def grid_points(grid: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """The cartesian product as a list of {key: value} (first key varies slowest)."""
    keys = [k for k, _ in grid]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in grid))]


def run_name(point: dict[str, str]) -> str:
    """A directory-safe name: the last component of each key with its value, e.g.
    'eps_high=0.28_beta=0'; the full key where last components would collide."""
    short = [k.rsplit(".", 1)[-1] for k in point]
    parts = []
    for key, s in zip(point, short):
        label = s if short.count(s) == 1 else key
        parts.append(f"{label}={point[key]}")
    name = "_".join(parts) or "base"
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", name)


def build_command(program: str, config: str, workdir: str, point: dict[str, str],
                  extra: list[str]) -> list[str]:
    return (shlex.split(program) + [f"--config={config}", f"--workdir={workdir}"]
            + [f"--config.{k}={v}" for k, v in point.items()] + list(extra))


def run_all(runs: list[dict], parallel: int, timeout_s: float | None) -> None:
    """Runs each run's command, `parallel` at a time; sets run['returncode'] (None: timed out)."""
    pending, active = list(runs), []
    while pending or active:
        while pending and len(active) < parallel:
            run = pending.pop(0)
            os.makedirs(run["workdir"], exist_ok=True)
            log = open(os.path.join(run["workdir"], "log.txt"), "w")
            proc = subprocess.Popen(run["command"], stdout=log, stderr=subprocess.STDOUT)
            active.append((run, proc, log, time.monotonic()))
            print(f"[sweep] started {run['name']}: {shlex.join(run['command'])}", flush=True)
        for item in list(active):
            run, proc, log, t0 = item
            if proc.poll() is None and timeout_s and time.monotonic() - t0 > timeout_s:
                proc.kill()
                proc.wait()
                run["timed_out"] = True
            if proc.poll() is not None:
                run["returncode"] = proc.returncode
                log.close()
                active.remove(item)
                print(f"[sweep] finished {run['name']}: exit {proc.returncode}", flush=True)
        time.sleep(0.05)


def summarize_run(run: dict) -> dict:
    """Final/best metrics of one run from its metrics.jsonl (missing file: status only)."""
    out = {"name": run["name"], "returncode": run.get("returncode")}
    try:
        rows = read_metrics(run["workdir"])
    except MetricsError as e:
        out["error"] = str(e)
        return out
    steps, reward = series(rows, "reward/mean")
    out["steps"] = int(max((r["step"] for r in rows), default=0))
    if reward:
        tail = reward[-max(1, len(reward) // 10):]
        out.update({"reward_final": reward[-1], "reward_best": max(reward),
                    "reward_last_tenth": sum(tail) / len(tail)})
    for key, name in (("kl", "kl_final"), ("entropy", "entropy_final"),
                      ("response_length/mean", "length_final"), ("reference_resets", "resets")):
        vals = series(rows, key)[1]
        if vals:
            out[name] = vals[-1]
    for key in CORRECTION_KEYS:
        vals = series(rows, key)[1]
        if vals:
            out[f"mean {key}"] = sum(vals) / len(vals)
    val_keys = {k for r in rows for k in r if k.startswith("val/") and k.endswith("/pass@1")}
    for vk in sorted(val_keys):
        out[f"best {vk}"] = max(series(rows, vk)[1], default=float("nan"))
    return out


def write_summary(runs: list[dict], path: str) -> list[dict]:
    """Writes the markdown table; returns the per-run summaries."""
    summaries = [summarize_run(r) for r in runs]
    columns = ["name", "returncode", "steps", "reward_final", "reward_best", "reward_last_tenth",
               "kl_final", "entropy_final", "length_final", "resets"]
    columns += sorted({k for s in summaries for k in s if k.startswith("best val/")})
    columns += [f"mean {k}" for k in CORRECTION_KEYS if any(f"mean {k}" in s for s in summaries)]

    def cell(v):
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for s in summaries:
        lines.append("| " + " | ".join(cell(s.get(c)) for c in columns) + " |")
    errors = [f"- {s['name']}: {s['error']}" for s in summaries if "error" in s]
    with open(path, "w") as f:
        f.write("# Sweep summary\n\n" + "\n".join(lines) + "\n")
        if errors:
            f.write("\nRuns without metrics:\n" + "\n".join(errors) + "\n")
    return summaries


def plot_compare(runs: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for run in runs:
        try:
            rows = read_metrics(run["workdir"])
        except MetricsError:
            continue
        for ax, key in zip(axes, ("reward/mean", "kl")):
            ax.plot(*series(rows, key), lw=1.2, label=run["name"])
    for ax, key in zip(axes, ("reward/mean", "kl")):
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if axes[0].lines:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description="Runs a grid of config overrides and compares them.")
    p.add_argument("--config", required=True, help="e.g. configs/prorl.py:demo")
    p.add_argument("--grid", action="append", default=[], help="'key=v1,v2' (repeatable)")
    p.add_argument("--workdir", required=True, help="runs go to WORKDIR/<name>/")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time")
    p.add_argument("--timeout_s", type=float, default=None, help="per-run wall-clock limit")
    p.add_argument("--program", default=DEFAULT_PROGRAM, help="command that trains one run")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = p.parse_args(argv)
    if args.parallel < 1:
        p.error(f"--parallel: expected >= 1, got {args.parallel}")
    return args, extra


def main(argv=None) -> int:
    args, extra = parse_args(argv)
    try:
        points = grid_points(parse_grid(args.grid))
    except ValueError as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 2
    runs = []
    for point in points:
        name = run_name(point)
        workdir = os.path.join(args.workdir, name)
        runs.append({"name": name, "overrides": point, "workdir": workdir,
                     "command": build_command(args.program, args.config, workdir, point, extra)})
    if args.dry_run:
        for run in runs:
            print(shlex.join(run["command"]))
        return 0
    os.makedirs(args.workdir, exist_ok=True)
    run_all(runs, args.parallel, args.timeout_s)
    with open(os.path.join(args.workdir, "sweep.json"), "w") as f:
        json.dump(runs, f, indent=2)
    write_summary(runs, os.path.join(args.workdir, "summary.md"))
    plot_compare(runs, os.path.join(args.workdir, "compare.png"))
    failed = [r["name"] for r in runs if r.get("returncode") != 0]
    print(f"[sweep] {len(runs) - len(failed)}/{len(runs)} runs succeeded; "
          f"summary in {os.path.join(args.workdir, 'summary.md')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
