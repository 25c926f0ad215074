"""Rollout engines behind one interface (`RolloutEngine` -> `RolloutBatch`)."""
from prorl_jax.rollout.base import FINISH_LENGTH, FINISH_STOP, RolloutBatch, RolloutEngine

__all__ = ["FINISH_LENGTH", "FINISH_STOP", "RolloutBatch", "RolloutEngine"]
