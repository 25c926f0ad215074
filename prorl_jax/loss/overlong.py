"""Overlong handling (algorithm.md, "Overlong handling"): lengths are counted in tokens."""
from __future__ import annotations

import jax.numpy as jnp

from prorl_jax.loss._checks import check_ndim, is_concrete_number


def overlong_filter_mask(mask, truncated):
    """Overlong filtering: mask [batch, time] with the rows of truncated responses zeroed.

    truncated: bool[batch], True where the response was cut at the max length
    (finish_reason "length"). Returns mask * (1 - truncated)[:, None], in mask's dtype.
    """
    mask = jnp.asarray(mask)
    truncated = jnp.asarray(truncated)
    check_ndim("mask", mask, 2, "[batch, time]")
    if truncated.shape != mask.shape[:1]:
        raise ValueError(f"truncated must be bool[batch] = [{mask.shape[0]}], "
                         f"got shape {tuple(truncated.shape)}")
    keep = jnp.logical_not(truncated.astype(bool))[:, None]
    return jnp.where(keep, mask, jnp.zeros_like(mask))


def soft_overlong_penalty(lengths, max_length, buffer_length, penalty_factor=1.0):
    """DAPO's soft overlong punishment, f32[batch], to add to the rewards.

        penalty(L) = max(-penalty_factor, min(0, -(L - (max_length - buffer_length))
                                                  / buffer_length * penalty_factor))

    0 up to max_length - buffer_length tokens, then linear down to -penalty_factor at
    max_length (and held there beyond, as in DAPO eq. 13). lengths: int or float [batch].
    """
    if is_concrete_number(buffer_length) and not buffer_length > 0:
        raise ValueError(f"buffer_length must be > 0 tokens, got {buffer_length!r}")
    if (is_concrete_number(buffer_length) and is_concrete_number(max_length)
            and buffer_length > max_length):
        raise ValueError(f"buffer_length={buffer_length!r} must not exceed "
                         f"max_length={max_length!r}")
    lengths = jnp.asarray(lengths, jnp.float32)
    expected_length = max_length - buffer_length
    penalty = -(lengths - expected_length) / buffer_length * penalty_factor
    return jnp.clip(penalty, -penalty_factor, 0.0)
