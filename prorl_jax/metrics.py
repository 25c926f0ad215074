"""Run metrics: one JSON line per step in WORKDIR/metrics.jsonl, TensorBoard when installed,
per-phase timers and a console line with tokens/s and an ETA."""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any, Iterator

from absl import logging


class PhaseTimer:
    """Accumulates wall-clock seconds per named phase: `with timer("rollout"): ...`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        """Returns {"time/<phase>": s} and starts over."""
        out = {f"time/{k}": round(v, 4) for k, v in self.seconds.items()}
        self.seconds = {}
        return out


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf
    return value


class MetricsWriter:
    """Appends step metrics to WORKDIR/metrics.jsonl (and TensorBoard if available).

    On resume, lines for steps after `truncate_after` are dropped first, so the file always
    matches the restored checkpoint.
    """

    def __init__(self, workdir: str, *, tensorboard: bool = False, truncate_after: int | None = None,
                 is_main: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.is_main = is_main
        if is_main and truncate_after is not None and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip()
                        and json.loads(line).get("step", 0) <= truncate_after]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)
        self._tb = None
        if tensorboard and is_main:
            try:
                from tensorboardX import SummaryWriter  # optional dependency
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
                except ImportError:
                    logging.info("TensorBoard writer not installed; metrics.jsonl only")

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.is_main:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in sorted(metrics.items())}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def console_line(step: int, total_steps: int, metrics: dict[str, Any], elapsed_s: float,
                 steps_done: int) -> str:
    """`step 10/120 | reward 0.41 | kl 2.1e-03 | ... | 812 tok/s | ETA 3m05s`."""
    keys = [("reward/mean", "reward", "{:.3f}"), ("loss/policy", "pg", "{:+.4f}"),
            ("kl", "kl", "{:.2e}"), ("entropy", "entropy", "{:.3f}"),
            ("response_length/mean", "len", "{:.1f}"), ("tokens_per_s", "tok/s", "{:.0f}")]
    parts = [f"step {step}/{total_steps}"]
    for key, label, fmt in keys:
        if key in metrics and isinstance(metrics[key], (int, float)):
            parts.append(f"{label} {fmt.format(metrics[key])}")
    phases = [f"{k[5:]} {v:.2f}s" for k, v in metrics.items() if k.startswith("time/")]
    if phases:
        parts.append(" ".join(phases))
    if steps_done > 0:
        eta = elapsed_s / steps_done * max(total_steps - step, 0)
        parts.append(f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")
    return " | ".join(parts)
