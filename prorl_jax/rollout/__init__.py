"""Rollout engines behind one interface (`RolloutEngine` -> `RolloutBatch`)."""
from prorl_jax.rollout.base import FINISH_LENGTH, FINISH_STOP, RolloutBatch, RolloutEngine
from prorl_jax.rollout.vllm_client import VLLMClient  # stdlib + numpy only: no torch/vllm/jax

__all__ = ["FINISH_LENGTH", "FINISH_STOP", "RolloutBatch", "RolloutEngine", "VLLMClient"]


def __getattr__(name):  # JaxSampler pulls in jax and flax, so it is imported only when asked for
    if name == "JaxSampler":
        from prorl_jax.rollout.jax_sampler import JaxSampler
        return JaxSampler
    raise AttributeError(f"module 'prorl_jax.rollout' has no attribute {name!r}")
