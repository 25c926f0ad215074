"""The ProRL loss as pure, jittable functions (algorithm.md): advantages, KL estimators, the
clipped policy loss, aggregation, the full objective, chunked token log-probs, and the
dynamic-sampling, overlong and pass@k helpers. Nothing here knows about models, configs or I/O.
"""
from prorl_jax.loss.advantages import STD_SCOPES, group_advantages, group_signal_mask
from prorl_jax.loss.aggregate import (AGG_MODES, TokenCounts, aggregate_loss, loss_denominator,
                                      loss_numerator, masked_mean, masked_sum, token_counts)
from prorl_jax.loss.kl import KL_KINDS, kl_estimate
from prorl_jax.loss.logprobs import DEFAULT_CHUNK_SIZE, token_logprobs
from prorl_jax.loss.objective import compute_loss
from prorl_jax.loss.overlong import overlong_filter_mask, soft_overlong_penalty
from prorl_jax.loss.evaluation import pass_at_k
from prorl_jax.loss.policy import ClipIndicators, log_ratio, policy_gradient_loss

__all__ = [
    "AGG_MODES", "ClipIndicators", "DEFAULT_CHUNK_SIZE", "KL_KINDS", "STD_SCOPES", "TokenCounts",
    "aggregate_loss", "compute_loss", "group_advantages", "group_signal_mask", "kl_estimate",
    "log_ratio", "loss_denominator", "loss_numerator", "masked_mean", "masked_sum",
    "overlong_filter_mask", "pass_at_k", "policy_gradient_loss", "soft_overlong_penalty",
    "token_counts", "token_logprobs",
]
