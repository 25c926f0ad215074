"""The ProRL loss of one (micro-)batch: clipped policy gradient + beta * KL - entropy bonus.

    token_loss = pg + beta * kl_estimate(logp, ref_logp, kl_kind) - entropy_coef * entropy
    loss       = aggregate_loss(token_loss, mask, agg_mode)

(algorithm.md, "The loss, per mini-batch"; ProRL: eps_low 0.2, eps_high 0.4, beta 1e-4, k3,
token-mean.)

Micro-batching (gradient accumulation inside a lax.scan), on the whole mini-batch mask:

    denom  = loss_denominator(mask, agg_mode, norm_len=norm_len)
    counts = token_counts(mask)

then call compute_loss on each micro-batch with global_denominator=denom, global_counts=counts
and *sum* the losses, gradients and every metric over micro-batches: each sum equals the value
for the whole mini-batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from prorl_jax.loss._checks import check_same_shape, is_concrete_number
from prorl_jax.loss.aggregate import TokenCounts, aggregate_loss, masked_sum, token_counts
from prorl_jax.loss.kl import kl_estimate
from prorl_jax.loss.policy import log_ratio, policy_gradient_loss


def _metrics(logp, old_logp, kl, pg, clip, entropy, mask, counts: TokenCounts, aggregate):
    """Token means normalised by counts.num_tokens (sum-friendly over micro-batches)."""
    def token_mean(x):
        return masked_sum(x, mask) / jnp.maximum(counts.num_tokens, 1.0)

    lr = log_ratio(logp, old_logp)
    local = token_counts(mask)
    metrics = {
        "pg_loss": aggregate(pg),
        "kl": token_mean(kl),
        "clip_frac_upper": token_mean(clip.upper),
        "clip_frac_lower": token_mean(clip.lower),
        "clip_frac_dual": token_mean(clip.dual),
        # KL(pi_old || pi_theta) on tokens sampled from pi_old: E[r - 1 - log r] (k3 form).
        "approx_kl": token_mean(jnp.exp(lr) - 1.0 - lr),
        "masked_frac": (local.num_positions - local.num_tokens) / counts.num_positions,
    }
    if entropy is not None:
        metrics["entropy"] = token_mean(entropy)
    return jax.lax.stop_gradient(metrics)


def compute_loss(logp, old_logp, ref_logp, advantages, mask, *, eps_low, eps_high, beta,
                 kl_kind: str = "k3", agg_mode: str = "token-mean", clip_c=None, entropy=None,
                 entropy_coef=0.0, norm_len=None, global_denominator=None,
                 global_counts: TokenCounts | None = None):
    """The scalar ProRL loss and its metrics for one (micro-)batch.

    logp, old_logp, ref_logp: f32[batch, time] log-probs of the sampled tokens under the current,
    sampling and reference policies (only logp carries gradient); advantages: f32[batch] (or
    [batch, time]); mask: [batch, time], 1 on response tokens that count; entropy: optional
    f32[batch, time] entropy of the current policy at each position (it carries gradient when
    entropy_coef != 0). norm_len: see aggregate_loss. global_denominator / global_counts: the
    mini-batch's loss_denominator / token_counts when this is a micro-batch (module doc).

    Returns (loss f32[], metrics dict of f32[]): pg_loss (aggregated like the loss), kl (token
    mean of the estimator), clip_frac_upper / clip_frac_lower / clip_frac_dual (fraction of
    tokens), approx_kl (KL old -> new, token mean), masked_frac (fraction of positions masked),
    entropy (token mean, when given).
    """
    mask = jnp.asarray(mask)
    check_same_shape(logp=jnp.asarray(logp), old_logp=jnp.asarray(old_logp),
                     ref_logp=jnp.asarray(ref_logp), mask=mask,
                     entropy=None if entropy is None else jnp.asarray(entropy))
    if entropy is None and not (is_concrete_number(entropy_coef) and entropy_coef == 0):
        raise ValueError(f"entropy_coef={entropy_coef!r} needs the entropy argument [batch, time]")
    pg, clip = policy_gradient_loss(logp, old_logp, advantages, eps_low=eps_low,
                                    eps_high=eps_high, clip_c=clip_c)
    kl = kl_estimate(logp, ref_logp, kl_kind)
    token_loss = pg + beta * kl
    if entropy is not None:
        token_loss = token_loss - entropy_coef * jnp.asarray(entropy, jnp.float32)

    def aggregate(values):
        return aggregate_loss(values, mask, agg_mode, norm_len=norm_len,
                              global_denominator=global_denominator)

    counts = token_counts(mask) if global_counts is None else global_counts
    metrics = _metrics(logp, old_logp, kl, pg, clip, entropy, mask, counts, aggregate)
    return aggregate(token_loss), metrics
