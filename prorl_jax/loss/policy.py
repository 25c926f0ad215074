"""The policy term of the ProRL loss: the token-level PPO clip and sequence-level variants,
picked by name from `POLICY_LOSSES` (config `loss.policy_loss`).

Every policy loss has one signature,

    fn(logp, old_logp, advantages, *, mask, eps_low, eps_high, clip_c) -> (pg, ClipIndicators)

logp, old_logp, mask: [batch, time]; advantages: [batch] (one per response, broadcast over its
tokens) or [batch, time]; pg: f32[batch, time], the per-token policy loss that the aggregation
(`aggregate_loss`) reduces. old_logp is a constant (stop_gradient); gradients flow through logp.
A new variant is one function with this signature and one entry in POLICY_LOSSES.

    ppo    token-level PPO clip with DAPO's clip-higher (ProRL; algorithm.md):
               log_ratio = clip(logp - old_logp, -20, 20),  r = exp(log_ratio)
               pg = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))
               dual clip (clip_c > 1, only where A < 0):  pg = min(pg, -A clip_c)
    gspo   GSPO (Zheng et al. 2025, arXiv 2507.18071), the length-normalised sequence ratio:
               s_b = exp(clip(sum_t m log r_bt / max(sum_t m, 1), -20, 20))   (geometric mean)
               pg_bt = max(-A_b s_b, -A_b clip(s_b, 1 - eps_low, 1 + eps_high))
               dual clip as ppo's, on s_b (GSPO's paper has none: clip_c None)
    cispo  CISPO (MiniMax-M1, arXiv 2506.13585), a clipped, stop-gradient IS weight times the
           log-prob (no token is ever dropped from the gradient):
               pg = -sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * logp

Clip ties, as torch does (verl, TRL): every clamp passes the gradient on its closed interval
(`_ops.clamp`), so at eps_low = 0 with r == 1, or at a log-ratio of exactly +-20, the token keeps
its full unclipped gradient -A r (jnp.clip would pass half); where both PPO branches are equal
the max takes the unclipped one (both have the same gradient there). At the dual-clip tie
pg == -A clip_c (r == clip_c exactly) the gradient goes to the PPO branch; torch.min would split it
0.5/0.5 - a set of measure zero, documented rather than copied.
ProRL: eps_low = 0.2, eps_high = 0.4; ProRL v2: 0.2, 0.27; GSPO's paper: 3e-4, 4e-4.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from prorl_jax.loss._checks import check_choice, check_ndim, check_same_shape, is_concrete_number
from prorl_jax.loss._ops import clamp

LOG_RATIO_CLAMP = 20.0


class ClipIndicators(NamedTuple):
    """Where each clip is active, bool[batch, time] each (per loss: see its docstring).

    ppo, gspo: upper: ratio > 1 + eps_high and A > 0; lower: ratio < 1 - eps_low and A < 0;
    dual: the dual clip replaced the loss (the ratio is r for ppo, s_b for gspo).
    cispo: upper / lower: the IS weight was clipped (r above / below the range, any A); dual: never.
    """
    upper: jnp.ndarray
    lower: jnp.ndarray
    dual: jnp.ndarray


def log_ratio(logp, old_logp):
    """clip(logp - stop_gradient(old_logp), -20, 20), f32[batch, time] (torch's clamp gradient)."""
    old_logp = jax.lax.stop_gradient(jnp.asarray(old_logp, jnp.float32))
    diff = jnp.asarray(logp, jnp.float32) - old_logp
    return clamp(diff, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _check_clip_args(eps_low, eps_high, clip_c, *, dual_clip: bool = True) -> None:
    if is_concrete_number(eps_low) and not 0.0 <= eps_low < 1.0:
        raise ValueError(f"eps_low must be in [0, 1), got {eps_low!r}")
    if is_concrete_number(eps_high) and not eps_high >= 0.0:
        raise ValueError(f"eps_high must be >= 0, got {eps_high!r}")
    if clip_c is not None and not dual_clip:
        raise ValueError(f"clip_c={clip_c!r}: the dual clip is defined for the clipped "
                         "surrogates (policy_loss 'ppo', 'gspo') only; pass clip_c=None")
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


def _clipped_surrogate(ratio, adv, eps_low, eps_high):
    """max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high)) and the upper/lower indicators;
    a tie goes to the unclipped branch."""
    unclipped = -adv * ratio
    clipped = -adv * clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    pg = jnp.where(unclipped >= clipped, unclipped, clipped)
    return pg, (ratio > 1.0 + eps_high) & (adv > 0), (ratio < 1.0 - eps_low) & (adv < 0)


def _dual_clip(pg, adv, clip_c):
    """(min(pg, -A clip_c) where A < 0, where it bit); pg unchanged without clip_c."""
    if clip_c is None:
        return pg, jnp.zeros(pg.shape, bool)
    dual_bound = -adv * clip_c
    dual = (adv < 0) & (pg > dual_bound)
    return jnp.where(dual, dual_bound, pg), dual


def policy_gradient_loss(logp, old_logp, advantages, *, mask=None, eps_low, eps_high,
                         clip_c=None):
    """"ppo": the per-token clipped policy loss (module doc) and where the clips are active.

    logp, old_logp: f32[batch, time]; advantages: f32[batch] (broadcast over time) or
    f32[batch, time]; mask: unused (token-level; accepted for the common signature).
    Returns (pg f32[batch, time], ClipIndicators). Masking is left to the aggregation.
    """
    _check_clip_args(eps_low, eps_high, clip_c)
    check_same_shape(logp=jnp.asarray(logp), old_logp=jnp.asarray(old_logp))
    adv = broadcast_advantages(advantages, jnp.shape(logp))
    ratio = jnp.exp(log_ratio(logp, old_logp))
    pg, upper, lower = _clipped_surrogate(ratio, adv, eps_low, eps_high)
    pg, dual = _dual_clip(pg, adv, clip_c)
    return pg, ClipIndicators(upper=upper, lower=lower, dual=dual)


def gspo_loss(logp, old_logp, advantages, *, mask, eps_low, eps_high, clip_c=None):
    """"gspo": GSPO's clipped sequence-level ratio (Zheng et al. 2025, "Group Sequence Policy
    Optimization", arXiv 2507.18071), as a per-token loss.

        J = E_b[ min(s_b A_b, clip(s_b, 1 - eps_low, 1 + eps_high) A_b) ],
        s_b = (pi(y_b) / pi_old(y_b)) ^ (1 / |y_b|) = exp(sum_t m_bt log r_bt / |y_b|)

    with |y_b| = max(sum_t m_bt, 1) the response's loss tokens (mask: [batch, time], the loss
    mask); log s_b is clamped to [-20, 20]. Every token of response b carries the same
    pg_bt = max(-A_b s_b, -A_b clip(s_b)); aggregated with "seq-mean-token-mean" (GSPO's mean over
    responses) the loss is J's negation and d pg_b / d logp_bt = -A_b s_b m_bt / |y_b| where
    unclipped. GSPO-token's s_bt = sg(s_b) pi_bt / sg(pi_bt) (verl) has this same gradient when
    A is constant over a response, as every estimator here makes it. clip_c: the dual clip on
    s_b (module doc; not in GSPO's paper). Returns (pg f32[batch, time], ClipIndicators) with
    the indicators of s_b on all of b's tokens.
    """
    _check_clip_args(eps_low, eps_high, clip_c)
    mask = jnp.asarray(mask, jnp.float32)
    check_ndim("mask", mask, 2, "[batch, time]")
    check_same_shape(logp=jnp.asarray(logp), old_logp=jnp.asarray(old_logp), mask=mask)
    adv = broadcast_advantages(advantages, mask.shape)
    lr = jnp.where(mask != 0, log_ratio(logp, old_logp), 0.0)
    length = jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)
    log_s = clamp(jnp.sum(lr * mask, axis=1, keepdims=True) / length,
                  -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    s = jnp.broadcast_to(jnp.exp(log_s), mask.shape)
    pg, upper, lower = _clipped_surrogate(s, adv, eps_low, eps_high)
    pg, dual = _dual_clip(pg, adv, clip_c)
    return pg, ClipIndicators(upper=upper, lower=lower, dual=dual)


def cispo_loss(logp, old_logp, advantages, *, mask=None, eps_low, eps_high, clip_c=None):
    """"cispo": CISPO's clipped IS-weight policy gradient (MiniMax-M1, arXiv 2506.13585).

        J = E[ sg(r_hat_t) A_t log pi(o_t) ],   r_hat = clip(r, 1 - eps_low, 1 + eps_high)
        pg_t = -sg(r_hat_t) * A_t * logp_t,     d pg_t / d logp_t = -r_hat_t A_t

    r = exp(clip(logp - old_logp, -20, 20)). Unlike the PPO clip no token loses its gradient: the
    clip only bounds its weight (MiniMax-M1 sets no lower bound: eps_low near 1). The value of pg is
    the paper's (-r_hat A logp, as verl and TRL compute it), not on PPO's scale; only its gradient
    is the policy gradient. mask: unused (token-level). Returns (pg f32[batch, time],
    ClipIndicators: upper = r > 1 + eps_high, lower = r < 1 - eps_low, for any A).
    """
    _check_clip_args(eps_low, eps_high, clip_c, dual_clip=False)
    logp = jnp.asarray(logp, jnp.float32)
    check_same_shape(logp=logp, old_logp=jnp.asarray(old_logp))
    adv = broadcast_advantages(advantages, logp.shape)
    ratio = jnp.exp(log_ratio(logp, old_logp))
    weight = jax.lax.stop_gradient(clamp(ratio, 1.0 - eps_low, 1.0 + eps_high))
    pg = -weight * adv * logp
    upper, lower = ratio > 1.0 + eps_high, ratio < 1.0 - eps_low
    return pg, ClipIndicators(upper=upper, lower=lower, dual=jnp.zeros_like(upper))


POLICY_LOSSES: dict[str, Callable] = {
    "ppo": policy_gradient_loss,
    "gspo": gspo_loss,
    "cispo": cispo_loss,
}


def policy_loss(name: str, logp, old_logp, advantages, *, mask, eps_low, eps_high, clip_c=None):
    """POLICY_LOSSES[name](...) (module doc); ValueError naming policy_loss for an unknown name."""
    check_choice("policy_loss", name, tuple(POLICY_LOSSES))
    return POLICY_LOSSES[name](logp, old_logp, advantages, mask=mask, eps_low=eps_low,
                               eps_high=eps_high, clip_c=clip_c)
