"""Group-relative advantages (GRPO) and the dynamic-sampling group filter (DAPO).

Rewards come as f32[N] with the n responses to one prompt stored consecutively: group g is
rows g*n .. g*n + n - 1 (the order of `RolloutBatch`).
"""
from __future__ import annotations

import numbers

import jax.numpy as jnp

from prorl_jax.loss._checks import (check_choice, check_ndim, check_positive_int,
                                    is_concrete_number)

STD_SCOPES = ("group", "batch")


def _grouped(rewards, group_size: int):
    """rewards f32[N] -> f32[N // group_size, group_size], with the shape checks."""
    rewards = jnp.asarray(rewards, jnp.float32)
    check_ndim("rewards", rewards, 1, "[num_responses]")
    group_size = check_positive_int("group_size", group_size, "responses per prompt")
    if rewards.shape[0] % group_size:
        raise ValueError(
            f"rewards has {rewards.shape[0]} entries, not a multiple of group_size={group_size}")
    return rewards.reshape(-1, group_size)


def _std(x, axis, ddof: int):
    """Standard deviation with `ddof` (sum of squares / max(count - ddof, 1): never NaN)."""
    count = x.size if axis is None else x.shape[axis]
    centered = x - jnp.mean(x, axis=axis, keepdims=True)
    variance = jnp.sum(centered**2, axis=axis, keepdims=True) / max(count - ddof, 1)
    return jnp.sqrt(variance)


def group_advantages(rewards, group_size: int, *, std_normalize: bool = True, eps=1e-6,
                     std_ddof: int = 1, std_scope: str = "group"):
    """GRPO advantages, one per response: f32[N] from rewards f32[N].

        A_i = (R_i - mean(R_G)) / (std(R) + eps)      (std_normalize=True)
        A_i =  R_i - mean(R_G)                        (std_normalize=False, Dr. GRPO)

    G is the group of response i (mean always over the group). std is over the group
    (std_scope="group") or over all N rewards of the batch (std_scope="batch"). By default std
    is the *sample* std (std_ddof=1, as verl and TRL compute it); std_ddof=0 gives the population
    std. Example: R = [1.0, 0.8, 0.0, 0.4] -> mean 0.55, sample std 0.443, population std 0.384.
    A group of one response (n=1) gets advantage 0, never NaN.
    """
    grouped = _grouped(rewards, group_size)
    check_choice("std_scope", std_scope, STD_SCOPES)
    if isinstance(std_ddof, bool) or not isinstance(std_ddof, numbers.Integral) or std_ddof < 0:
        raise ValueError(f"std_ddof must be an int >= 0, got {std_ddof!r}")
    if is_concrete_number(eps) and eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    centered = grouped - jnp.mean(grouped, axis=1, keepdims=True)
    if std_normalize:
        std_ddof = int(std_ddof)
        std = _std(grouped, 1, std_ddof) if std_scope == "group" else _std(grouped, None, std_ddof)
        centered = centered / (std + eps)
    return centered.reshape(-1)


def group_signal_mask(rewards, group_size: int, *, atol=0.0):
    """Dynamic sampling: bool[N // group_size], True for groups whose rewards are not all equal.

    A group is kept iff max(R_G) - min(R_G) > atol; all-0 or all-1 groups have zero advantages
    and carry no signal. Per response: jnp.repeat(mask, group_size).
    """
    grouped = _grouped(rewards, group_size)
    return (jnp.max(grouped, axis=1) - jnp.min(grouped, axis=1)) > atol
