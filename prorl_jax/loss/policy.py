"""The clipped policy-gradient term of the ProRL loss (PPO clip with DAPO's clip-higher).

Per token, with A the advantage of the response (constant over its tokens):

    log_ratio = clip(logp - old_logp, -20, 20)
    r  = exp(log_ratio)
    pg = max(-A * r, -A * clip(r, 1 - eps_low, 1 + eps_high))
    dual clip (clip_c > 1, only where A < 0):  pg = min(pg, -A * clip_c)

old_logp is a constant (stop_gradient). Where a clip is active the token's gradient is zero.
ProRL: eps_low = 0.2, eps_high = 0.4.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from prorl_jax.loss._checks import check_same_shape, is_concrete_number

LOG_RATIO_CLAMP = 20.0


class ClipIndicators(NamedTuple):
    """Where each clip is active, bool[batch, time] each.

    upper: r > 1 + eps_high and A > 0;  lower: r < 1 - eps_low and A < 0;
    dual:  the dual clip replaced the loss (A < 0 and pg > -A * clip_c).
    """
    upper: jnp.ndarray
    lower: jnp.ndarray
    dual: jnp.ndarray


def log_ratio(logp, old_logp):
    """clip(logp - stop_gradient(old_logp), -20, 20), f32[batch, time]."""
    old_logp = jax.lax.stop_gradient(jnp.asarray(old_logp, jnp.float32))
    diff = jnp.asarray(logp, jnp.float32) - old_logp
    return jnp.clip(diff, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _check_clip_args(eps_low, eps_high, clip_c) -> None:
    if is_concrete_number(eps_low) and not 0.0 <= eps_low < 1.0:
        raise ValueError(f"eps_low must be in [0, 1), got {eps_low!r}")
    if is_concrete_number(eps_high) and not eps_high >= 0.0:
        raise ValueError(f"eps_high must be >= 0, got {eps_high!r}")
    if clip_c is not None and is_concrete_number(clip_c) and not clip_c > 1.0:
        raise ValueError(f"clip_c (dual clip) must be > 1 or None, got {clip_c!r}")


def broadcast_advantages(advantages, shape):
    """advantages f32[batch] (or already f32[batch, time]) -> f32[batch, time]."""
    advantages = jnp.asarray(advantages, jnp.float32)
    if advantages.ndim == 1 and advantages.shape[0] == shape[0]:
        return jnp.broadcast_to(advantages[:, None], shape)
    if advantages.shape == tuple(shape):
        return advantages
    raise ValueError(f"advantages must be [batch] = [{shape[0]}] or [batch, time] = {list(shape)}, "
                     f"got shape {tuple(advantages.shape)}")


def policy_gradient_loss(logp, old_logp, advantages, *, eps_low, eps_high, clip_c=None):
    """Per-token clipped policy loss (module doc) and where the clips are active.

    logp, old_logp: f32[batch, time]; advantages: f32[batch] (broadcast over time) or
    f32[batch, time]. Returns (pg f32[batch, time], ClipIndicators). Masking is left to the
    aggregation.
    """
    _check_clip_args(eps_low, eps_high, clip_c)
    check_same_shape(logp=jnp.asarray(logp), old_logp=jnp.asarray(old_logp))
    adv = broadcast_advantages(advantages, jnp.shape(logp))
    ratio = jnp.exp(log_ratio(logp, old_logp))
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    pg = jnp.maximum(unclipped, clipped)
    upper = (ratio > 1.0 + eps_high) & (adv > 0)
    lower = (ratio < 1.0 - eps_low) & (adv < 0)
    if clip_c is None:
        dual = jnp.zeros_like(upper)
    else:
        dual_bound = -adv * clip_c
        dual = (adv < 0) & (pg > dual_bound)
        pg = jnp.where(dual, dual_bound, pg)
    return pg, ClipIndicators(upper=upper, lower=lower, dual=dual)
