"""The ProRL loss of one (micro-)batch: policy term + beta * KL - entropy bonus, with an optional
off-policy correction for the sampler/trainer gap.

    weight, m' = importance_correction(old_logp, sampler_logp, mask, correction)  (constants)
    pg         = POLICY_LOSSES[policy_loss](logp, old_logp, advantages, mask=m')
    token_loss = weight * pg + beta * kl_estimate(logp, ref_logp, kl_kind) - entropy_coef * entropy
    loss       = aggregate_loss(token_loss, m', agg_mode)

(algorithm.md, "The loss, per mini-batch" and "Off-policy corrections"; ProRL: ppo, eps_low 0.2,
eps_high 0.4, beta 1e-4, k3, token-mean, no correction; ProRL v2: eps_high 0.27, k2, icepop.)
A token the correction rejects leaves the numerator and the denominator.

Micro-batching (gradient accumulation inside a lax.scan), on the whole mini-batch:

    denom, counts = loss_normalizers(mask, agg_mode=..., old_logp=..., sampler_logp=...,
                                     correction=..., ...)

(the denominator of the *corrected* mask of the whole mini-batch), then call compute_loss on each
micro-batch with global_denominator=denom, global_counts=counts and *sum* the losses, gradients
and every metric over micro-batches: each sum equals the value for the whole mini-batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from prorl_jax.loss._checks import check_same_shape, is_concrete_number
from prorl_jax.loss.aggregate import (TokenCounts, aggregate_loss, loss_denominator, masked_sum,
                                      token_counts)
from prorl_jax.loss.corrections import importance_correction, sampler_log_ratio
from prorl_jax.loss.kl import kl_estimate
from prorl_jax.loss.policy import log_ratio, policy_loss as policy_term


def loss_normalizers(mask, *, agg_mode: str, norm_len=None, old_logp=None, sampler_logp=None,
                     correction: str = "none", correction_low=None, correction_high=None):
    """(denominator f32[], TokenCounts) of a whole mini-batch, from its corrected loss mask.

    mask: [batch, time] the loss mask before the correction; the other arguments as compute_loss.
    Pass both to every micro-batch's compute_loss (module doc).
    """
    _, corrected = importance_correction(old_logp, sampler_logp, mask, kind=correction,
                                         low=correction_low, high=correction_high)
    return (loss_denominator(corrected, agg_mode, norm_len=norm_len),
            token_counts(mask, corrected))


def _metrics(logp, old_logp, kl, pg, clip, entropy, mask, counts: TokenCounts, aggregate):
    """Token means over the loss tokens, normalised by the mini-batch's counts (so that they sum
    over micro-batches)."""
    def token_mean(x):
        return masked_sum(x, mask) / jnp.maximum(counts.num_tokens, 1.0)

    lr = log_ratio(logp, old_logp)
    metrics = {
        "pg_loss": aggregate(pg),
        "kl": token_mean(kl),
        "clip_frac_upper": token_mean(clip.upper),
        "clip_frac_lower": token_mean(clip.lower),
        "clip_frac_dual": token_mean(clip.dual),
        # KL(pi_old || pi_theta) on tokens sampled from pi_old: E[r - 1 - log r] (k3 form).
        "approx_kl": token_mean(jnp.exp(lr) - 1.0 - lr),
        "masked_frac": (mask.size - jnp.sum(mask)) / counts.num_positions,
    }
    if entropy is not None:
        metrics["entropy"] = token_mean(entropy)
    return metrics


def _correction_metrics(old_logp, sampler_logp, mask, corrected, weight, counts: TokenCounts):
    """correction/masked_frac (loss tokens rejected), correction/weight_mean (over the tokens
    kept), correction/mismatch_abs and correction/mismatch_k3 (mean |d| and exp(d) - d - 1 over
    the loss tokens before the correction), each sum-friendly over micro-batches."""
    d = sampler_log_ratio(old_logp, sampler_logp)
    response = jnp.maximum(counts.num_response_tokens, 1.0)
    return {
        "correction/masked_frac": (jnp.sum(mask) - jnp.sum(corrected)) / response,
        "correction/weight_mean": masked_sum(weight, corrected)
        / jnp.maximum(counts.num_tokens, 1.0),
        "correction/mismatch_abs": masked_sum(jnp.abs(d), mask) / response,
        "correction/mismatch_k3": masked_sum(jnp.exp(d) - d - 1.0, mask) / response,
    }


def compute_loss(logp, old_logp, ref_logp, advantages, mask, *, eps_low, eps_high, beta,
                 kl_kind: str = "k3", kl_clamp: bool = False, agg_mode: str = "token-mean",
                 policy_loss: str = "ppo",
                 clip_c=None, entropy=None, entropy_coef=0.0, norm_len=None, sampler_logp=None,
                 correction: str = "none", correction_low=None, correction_high=None,
                 global_denominator=None, global_counts: TokenCounts | None = None):
    """The scalar ProRL loss and its metrics for one (micro-)batch (module doc).

    logp, old_logp, ref_logp: f32[batch, time] log-probs of the sampled tokens under the current,
    old (the update's start) and reference policies (only logp carries gradient); advantages:
    f32[batch] (or [batch, time]); mask: [batch, time], 1 on response tokens that count; entropy:
    optional f32[batch, time] entropy of the current policy at each position (it carries gradient
    when entropy_coef != 0). kl_clamp: kl_estimate's clamps for every kind. policy_loss: a
    POLICY_LOSSES name. norm_len: see aggregate_loss.
    sampler_logp: optional f32[batch, time], the engine's log-probs of the sampled tokens;
    correction, correction_low, correction_high: importance_correction's kind, low, high.
    global_denominator / global_counts: the mini-batch's loss_normalizers when this is a
    micro-batch (module doc).

    Returns (loss f32[], metrics dict of f32[]): pg_loss (the weighted policy term, aggregated
    like the loss), kl (token mean of the estimator), clip_frac_upper / clip_frac_lower /
    clip_frac_dual (fraction of loss tokens), approx_kl (KL old -> new, token mean), masked_frac
    (fraction of positions not in the loss), entropy (token mean, when given); with sampler_logp
    also correction/masked_frac, correction/weight_mean, correction/mismatch_abs and
    correction/mismatch_k3 (corrections module doc).
    """
    mask = jnp.asarray(mask)
    check_same_shape(logp=jnp.asarray(logp), old_logp=jnp.asarray(old_logp),
                     ref_logp=jnp.asarray(ref_logp), mask=mask,
                     entropy=None if entropy is None else jnp.asarray(entropy))
    if entropy is None and not (is_concrete_number(entropy_coef) and entropy_coef == 0):
        raise ValueError(f"entropy_coef={entropy_coef!r} needs the entropy argument [batch, time]")
    weight, loss_mask = importance_correction(old_logp, sampler_logp, mask, kind=correction,
                                              low=correction_low, high=correction_high)
    pg, clip = policy_term(policy_loss, logp, old_logp, advantages, mask=loss_mask,
                           eps_low=eps_low, eps_high=eps_high, clip_c=clip_c)
    pg = weight * pg
    kl = kl_estimate(logp, ref_logp, kl_kind, clamped=kl_clamp)
    token_loss = pg + beta * kl
    if entropy is not None:
        token_loss = token_loss - entropy_coef * jnp.asarray(entropy, jnp.float32)

    def aggregate(values):
        return aggregate_loss(values, loss_mask, agg_mode, norm_len=norm_len,
                              global_denominator=global_denominator)

    counts = token_counts(mask, loss_mask) if global_counts is None else global_counts
    metrics = _metrics(logp, old_logp, kl, pg, clip, entropy, loss_mask, counts, aggregate)
    if sampler_logp is not None:
        metrics.update(_correction_metrics(old_logp, sampler_logp, jnp.asarray(mask, jnp.float32),
                                           loss_mask, weight, counts))
    return aggregate(token_loss), jax.lax.stop_gradient(metrics)
