"""When to hard-reset the reference policy (ProRL): the triggers, as a small pure state machine.

Triggers (algorithm.md): a fixed interval, a stage boundary, validation not improving for N
evaluations, the step's mean KL above a threshold, and by hand on resume. The reset itself
(pi_ref <- pi_theta, optimizer re-initialised) is `prorl_jax.train_state.reset_reference`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from prorl_jax.fields import Section, at_least, field, int_at_least

INTERVAL = "interval"
STAGE = "stage_boundary"
PLATEAU = "validation_plateau"
KL = "kl_threshold"
MANUAL = "manual"


@dataclasses.dataclass(frozen=True)
class ResetConfig(Section):
    """The reset triggers (config.reset; documented in configs/prorl.py): interval_steps,
    plateau_patience and kl_threshold (0: off each), on_stage_boundary, on_resume (by hand)."""
    interval_steps: int = field("reset.interval_steps", 0, *int_at_least(0))
    on_stage_boundary: bool = field("reset.on_stage_boundary", True)
    plateau_patience: int = field("reset.plateau_patience", 0, *int_at_least(0))
    kl_threshold: float = field("reset.kl_threshold", 0.0, *at_least(0))
    on_resume: bool = field("reset.on_resume", False)


@dataclasses.dataclass
class ResetTracker:
    """Decides reset triggers from the run's history; its fields go into the checkpoint.

    interval_steps: reset when `interval_steps` steps have passed since the last reset (0: off).
    plateau_patience: reset after this many validations without a new best since the last
        reset (0: off). kl_threshold: reset when a step's mean KL exceeds it (0: off).
    """
    interval_steps: int = 0
    plateau_patience: int = 0
    kl_threshold: float = 0.0
    last_reset_step: int = 0
    best_val: Optional[float] = None
    evals_since_best: int = 0

    def check_step(self, step: int, *, kl: float | None = None,
                   stage_start: bool = False) -> Optional[str]:
        """The trigger that fires before training step `step` (0-based), or None.

        `kl` is the mean KL of the last step; `stage_start` marks the first step of a stage
        after the first one.
        """
        if stage_start:
            return STAGE
        if self.kl_threshold > 0 and kl is not None and kl > self.kl_threshold:
            return KL
        if self.interval_steps > 0 and step > 0 and \
                step - self.last_reset_step >= self.interval_steps:
            return INTERVAL
        if self.plateau_patience > 0 and self.evals_since_best >= self.plateau_patience:
            return PLATEAU
        return None

    @classmethod
    def from_config(cls, cfg: ResetConfig) -> "ResetTracker":
        return cls(cfg.interval_steps, cfg.plateau_patience, cfg.kl_threshold)

    def record_validation(self, score: float) -> None:
        """Feeds a validation score (higher is better, e.g. mean pass@1)."""
        if self.best_val is None or score > self.best_val:
            self.best_val, self.evals_since_best = score, 0
        else:
            self.evals_since_best += 1

    def record_reset(self, step: int) -> None:
        """Call after a reset at `step`: the interval and the plateau count start again."""
        self.last_reset_step = step
        self.best_val, self.evals_since_best = None, 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key in ("last_reset_step", "best_val", "evals_since_best"):
            setattr(self, key, state[key])
