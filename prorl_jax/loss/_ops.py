"""Elementwise helpers shared by the loss functions, with torch's gradients at the boundaries.

jnp.clip is max(min(x, hi), lo), and JAX splits the gradient of max/min 0.5/0.5 at a tie, so at
x == lo or x == hi exactly jnp.clip passes half the gradient. torch.clamp passes all of it on the
closed interval [lo, hi]. The PPO clip meets those ties (eps_low = 0 with r == 1; a log-ratio of
exactly +-20), so the loss clamps with `clamp` below: the gradient is 1 on [lo, hi], 0 outside,
as in torch (and so in verl and TRL).
"""
from __future__ import annotations

import jax.numpy as jnp


def clamp(x, lo=None, hi=None):
    """x clipped to [lo, hi] (either bound may be None); d/dx = 1 on the closed interval, else 0.

    Same values as jnp.clip; the gradient at x == lo or x == hi is torch.clamp's (1, not 0.5).
    """
    x = jnp.asarray(x)
    if lo is not None:
        x = jnp.where(x < lo, jnp.asarray(lo, x.dtype), x)
    if hi is not None:
        x = jnp.where(x > hi, jnp.asarray(hi, x.dtype), x)
    return x
