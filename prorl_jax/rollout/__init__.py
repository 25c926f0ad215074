"""Rollout engines behind one interface (`RolloutEngine` -> `RolloutBatch`)."""
from prorl_jax.rollout.base import FINISH_LENGTH, FINISH_STOP, RolloutBatch, RolloutEngine
from prorl_jax.rollout.vllm_client import VLLMClient  # stdlib + numpy only: no torch/vllm/jax

__all__ = ["FINISH_LENGTH", "FINISH_STOP", "RolloutBatch", "RolloutEngine", "VLLMClient"]
