"""Advantage estimators, picked by name (config `loss.adv_estimator`), and the dynamic-sampling
group filter (DAPO). algorithm.md, "Advantage estimators":

    grpo                   A_i = (R_i - mean(R_G)) / (std(R_G) + eps)   (group or batch std, or
                           none: Dr.GRPO)                                  (ProRL)
    rloo                   A_i = R_i - mean_{j in G, j != i} R_j = n/(n-1) (R_i - mean(R_G))
                           (Ahmadian et al. 2024, arXiv 2402.14740; no std division)
    reinforce_pp_baseline  a_i = R_i - mean(R_G), then whitened over every response token of the
                           batch (Hu et al. 2025, REINFORCE++, arXiv 2501.03262)      (ProRL v2)

Rewards come as f32[N] with the n responses to one prompt stored consecutively: group g is
rows g*n .. g*n + n - 1 (the order of `RolloutBatch`).

Exact zeros: every estimator centres each group on its first reward before averaging, so a
group of identical rewards has R_i - mean(R_G) exactly 0 in float32 (a plain mean of sixteen
0.7s is off by an ulp, and dividing that by an ulp-sized std gave advantages of 0.1). For grpo
and rloo such a group's advantages are then exactly 0. For reinforce_pp_baseline they are exactly
0 before the batch whitening; after it they are (0 - mu) / (sd + eps), the shift every response
of the batch gets (exactly 0 when the batch's mu is 0, e.g. a batch of such groups).
A new estimator is one function and one entry in ADVANTAGE_ESTIMATORS.
"""
from __future__ import annotations

import numbers
from typing import Callable

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


def _group_centered(grouped):
    """R_i - mean(R_G) per group [groups, n], exactly 0 for a group of identical rewards: centred
    on the group's first reward before averaging (R - R_0 is exact; the mean of zeros is 0)."""
    shifted = grouped - grouped[:, :1]
    return shifted - jnp.mean(shifted, axis=1, keepdims=True)


def _check_eps(eps) -> None:
    if is_concrete_number(eps) and eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")


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
    A group of one response (n=1) gets advantage 0, never NaN; a group of identical rewards gets
    exactly 0 (module doc).
    """
    grouped = _grouped(rewards, group_size)
    check_choice("std_scope", std_scope, STD_SCOPES)
    if isinstance(std_ddof, bool) or not isinstance(std_ddof, numbers.Integral) or std_ddof < 0:
        raise ValueError(f"std_ddof must be an int >= 0, got {std_ddof!r}")
    _check_eps(eps)
    centered = _group_centered(grouped)
    if std_normalize:
        std_ddof = int(std_ddof)
        std = _std(grouped, 1, std_ddof) if std_scope == "group" else _std(grouped, None, std_ddof)
        centered = centered / (std + eps)
    return centered.reshape(-1)


def rloo_advantages(rewards, group_size: int):
    """RLOO: the leave-one-out baseline, f32[N] from rewards f32[N] (Ahmadian et al. 2024).

        A_i = R_i - (1 / (n - 1)) sum_{j in G, j != i} R_j = n / (n - 1) * (R_i - mean(R_G))

    Example: R = [1, 0, 0, 1] -> [2/3, -2/3, -2/3, 2/3]. A group of one response (n = 1) has no
    baseline: advantage 0.
    """
    grouped = _grouped(rewards, group_size)
    n = grouped.shape[1]
    scale = n / (n - 1) if n > 1 else 0.0
    return (_group_centered(grouped) * scale).reshape(-1)


def reinforce_pp_baseline_advantages(rewards, group_size: int, lengths, eps=1e-6):
    """REINFORCE++-baseline advantages (ProRL v2), f32[N] from rewards f32[N].

        a_i = R_i - mean(R_G)
        mu  = sum_i L_i a_i / sum_i L_i
        sd  = sqrt(sum_i L_i (a_i - mu)^2 / sum_i L_i)
        A_i = (a_i - mu) / (sd + eps)

    L_i = lengths[i], response i's length in loss tokens (int[N], >= 0): the whitening is over
    every response token of the batch, as verl's masked_whiten of the token-level advantages (a
    response with L_i = 0, e.g. overlong-filtered, does not count); sd is algorithm.md's
    population form (verl applies Bessel's correction and divides by sqrt(var + 1e-8): the same
    to ~1 / sum_i L_i). Hu et al. 2025, REINFORCE++ (arXiv 2501.03262). A batch with no loss
    token gets zeros.
    Example: R = [1, 0], L = [1, 3] -> a = [0.5, -0.5], mu = -0.25, sd = sqrt(3) / 4,
    A = [sqrt(3), -1 / sqrt(3)] (up to eps).
    """
    grouped = _grouped(rewards, group_size)
    _check_eps(eps)
    lengths = jnp.asarray(lengths)
    check_ndim("lengths", lengths, 1, "[num_responses]")
    if lengths.shape[0] != grouped.size:
        raise ValueError(f"lengths must be int[N] = [{grouped.size}] (one per reward), "
                         f"got shape {tuple(lengths.shape)}")
    weights = lengths.astype(jnp.float32)
    a = _group_centered(grouped).reshape(-1)
    total = jnp.sum(weights)
    safe_total = jnp.maximum(total, 1.0)
    mu = jnp.sum(weights * a) / safe_total
    sd = jnp.sqrt(jnp.sum(weights * (a - mu) ** 2) / safe_total)
    return jnp.where(total > 0, (a - mu) / (sd + eps), 0.0)


def _grpo(rewards, group_size, *, lengths, eps, std_normalize, std_scope, std_ddof):
    return group_advantages(rewards, group_size, std_normalize=std_normalize, eps=eps,
                            std_ddof=std_ddof, std_scope=std_scope)


def _rloo(rewards, group_size, **_):
    return rloo_advantages(rewards, group_size)


def _reinforce_pp_baseline(rewards, group_size, *, lengths, eps, **_):
    if lengths is None:
        raise ValueError("adv_estimator='reinforce_pp_baseline' needs lengths int[N] "
                         "(each response's loss tokens)")
    return reinforce_pp_baseline_advantages(rewards, group_size, lengths, eps)


# name -> fn(rewards, group_size, *, lengths, eps, std_normalize, std_scope, std_ddof); the
# std options are GRPO's, the other estimators ignore them.
ADVANTAGE_ESTIMATORS: dict[str, Callable] = {
    "grpo": _grpo,
    "rloo": _rloo,
    "reinforce_pp_baseline": _reinforce_pp_baseline,
}


def compute_advantages(estimator: str, rewards, group_size: int, *, lengths=None, eps=1e-6,
                       std_normalize: bool = True, std_scope: str = "group", std_ddof: int = 1):
    """Advantages f32[N] of `estimator` (module doc) from rewards f32[N].

    lengths: int[N] loss tokens per response (reinforce_pp_baseline needs them); std_normalize,
    std_scope, std_ddof: grpo's options (see group_advantages). ValueError naming adv_estimator
    for an unknown name.
    """
    check_choice("adv_estimator", estimator, tuple(ADVANTAGE_ESTIMATORS))
    return ADVANTAGE_ESTIMATORS[estimator](
        rewards, group_size, lengths=lengths, eps=eps, std_normalize=std_normalize,
        std_scope=std_scope, std_ddof=std_ddof)


def group_signal_mask(rewards, group_size: int, *, atol=0.0):
    """Dynamic sampling: bool[N // group_size], True for groups whose rewards are not all equal.

    A group is kept iff max(R_G) - min(R_G) > atol; all-0 or all-1 groups have zero advantages
    and carry no signal. Per response: jnp.repeat(mask, group_size).
    """
    grouped = _grouped(rewards, group_size)
    return (jnp.max(grouped, axis=1) - jnp.min(grouped, axis=1)) > atol
