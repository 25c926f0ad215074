"""Per-token estimators of KL(pi_theta || pi_ref) from tokens sampled from pi_theta.

With d = ref_logp - logp (per token; ref_logp is a constant: gradients flow through logp only):

    k1 = -d                                   (log pi_theta - log pi_ref; unbiased, any sign)
    k2 = d^2 / 2                              (biased, low variance)
    k3 = exp(d) - d - 1                       (unbiased, >= 0, "low_var_kl", ProRL's choice);
                                               d clamped to [-20, 20], result to [-10, 10] (verl)

clamped=True applies those two clamps to every kind (NeMo-RL's kl_input_clamp_value = 20 and
kl_output_clamp_value = 10; ProRL v2 clamps its k2 so): d to [-20, 20] before, the estimate to
[-10, 10] after. k3 is always clamped (exp(d) would overflow).

A kind with a trailing "+" ("k1+", "k3+"; verl's "kl+"/"low_var_kl+") is straight-through: its
value is that estimator's and its gradient is k2's (d(k2)/d(logp) = logp - ref_logp, the gradient
of the true KL's second-order expansion), computed as k2 + stop_gradient(k - k2). ("k2+" would be
k2 itself, so it is not a kind.) All five are choices of `loss.kl_kind`.

The clamps pass the gradient on their closed intervals, as torch.clamp does (`_ops.clamp`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from prorl_jax.loss._checks import check_choice, check_same_shape
from prorl_jax.loss._ops import clamp

KL_KINDS = ("k1", "k2", "k3", "k1+", "k3+")
LOG_RATIO_CLAMP = 20.0   # |d| bound before exp in k3
K3_CLAMP = 10.0          # |k3| bound (|estimate| bound with clamped=True)


def _estimator(d, kind: str, clamped: bool):
    if clamped or kind == "k3":
        d = clamp(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if kind == "k1":
        value = -d
    elif kind == "k2":
        value = 0.5 * d**2
    else:
        value = jnp.exp(d) - d - 1.0
    if clamped or kind == "k3":
        value = clamp(value, -K3_CLAMP, K3_CLAMP)
    return value


def kl_estimate(logp, ref_logp, kind: str = "k3", *, clamped: bool = False):
    """Per-token KL estimate f32[batch, time] from logp, ref_logp f32[batch, time] (module doc);
    clamped: clamp d and the estimate for every kind (k3: always)."""
    check_choice("kl_kind", kind, KL_KINDS)
    logp = jnp.asarray(logp, jnp.float32)
    ref_logp = jnp.asarray(ref_logp, jnp.float32)
    check_same_shape(logp=logp, ref_logp=ref_logp)
    d = jax.lax.stop_gradient(ref_logp) - logp
    value = _estimator(d, kind.rstrip("+"), bool(clamped))
    if not kind.endswith("+"):
        return value
    k2 = _estimator(d, "k2", False)
    return k2 + jax.lax.stop_gradient(value - k2)
