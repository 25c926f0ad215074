"""The ProRL loss as pure, jittable functions (algorithm.md): advantage estimators, KL
estimators, the policy losses (PPO clip, GSPO, CISPO), off-policy corrections, aggregation, the
full objective, chunked token log-probs, and the dynamic-sampling, overlong, length and pass@k
helpers. Nothing here knows about models, configs or I/O. Variants are picked by name from small
registries: ADVANTAGE_ESTIMATORS, POLICY_LOSSES, CORRECTIONS, KL_KINDS, AGG_MODES.
"""
from prorl_jax.loss.advantages import (ADVANTAGE_ESTIMATORS, STD_SCOPES, compute_advantages,
                                       group_advantages, group_signal_mask,
                                       reinforce_pp_baseline_advantages, rloo_advantages)
from prorl_jax.loss.aggregate import (AGG_MODES, TokenCounts, aggregate_loss, loss_denominator,
                                      loss_numerator, masked_mean, masked_sum, token_counts)
from prorl_jax.loss.corrections import CORRECTIONS, importance_correction, sampler_log_ratio
from prorl_jax.loss.kl import KL_KINDS, kl_estimate
from prorl_jax.loss.logprobs import DEFAULT_CHUNK_SIZE, token_logprobs
from prorl_jax.loss.objective import compute_loss, loss_normalizers
from prorl_jax.loss.overlong import (LENGTH_PENALTIES, cosine_length_reward,
                                     overlong_filter_mask, soft_overlong_penalty)
from prorl_jax.loss.evaluation import pass_at_k
from prorl_jax.loss.policy import (POLICY_LOSSES, ClipIndicators, cispo_loss, gspo_loss,
                                   log_ratio, policy_gradient_loss, policy_loss)

__all__ = [
    "ADVANTAGE_ESTIMATORS", "AGG_MODES", "CORRECTIONS", "ClipIndicators", "DEFAULT_CHUNK_SIZE",
    "KL_KINDS", "LENGTH_PENALTIES", "POLICY_LOSSES", "STD_SCOPES", "TokenCounts",
    "aggregate_loss", "cispo_loss", "compute_advantages", "compute_loss", "cosine_length_reward",
    "group_advantages", "group_signal_mask", "gspo_loss", "importance_correction", "kl_estimate",
    "log_ratio", "loss_denominator", "loss_normalizers", "loss_numerator", "masked_mean",
    "masked_sum", "overlong_filter_mask", "pass_at_k", "policy_gradient_loss", "policy_loss",
    "reinforce_pp_baseline_advantages", "rloo_advantages", "sampler_log_ratio",
    "soft_overlong_penalty", "token_counts", "token_logprobs",
]
