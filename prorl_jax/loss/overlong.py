"""Overlong handling and length shaping of the rewards (algorithm.md, "Overlong handling" and
"ProRL v2"): lengths are counted in tokens."""
from __future__ import annotations

import math

import jax.numpy as jnp

from prorl_jax.loss._checks import check_ndim, is_concrete_number

LENGTH_PENALTIES = ("none", "cosine")   # reward.length_penalty: "cosine" is cosine_length_reward


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


def cosine_length_reward(rewards, lengths, max_length, *, correct_threshold=1.0,
                         correct_range=(1.0, 0.5), wrong_range=(0.0, -0.5)):
    """The cosine length-scaling reward of Yeo et al. 2025 ("Demystifying Long Chain-of-Thought
    Reasoning in LLMs", arXiv 2502.03373, their CosFn), ProRL v2's length penalty; f32[batch].

        cos_t  = cos(pi * L / L_max)
        reward = r_end + (r_start - r_end) * (1 + cos_t) / 2

    (r_start, r_end) = correct_range where rewards >= correct_threshold, wrong_range elsewhere:
    r_start at L = 0, r_end at L = L_max (and beyond: L is capped at L_max). With the defaults a
    correct answer earns 1.0 down to 0.5 and a wrong one 0.0 down to -0.5 as it grows longer.
    rewards: f32[batch] verifier rewards; lengths: int or float [batch] response tokens;
    max_length: L_max > 0 tokens.
    """
    if is_concrete_number(max_length) and not max_length > 0:
        raise ValueError(f"max_length must be > 0 tokens, got {max_length!r}")
    for name, pair in (("correct_range", correct_range), ("wrong_range", wrong_range)):
        if len(pair) != 2:
            raise ValueError(f"{name} must be (r_start, r_end), got {pair!r}")
    rewards = jnp.asarray(rewards, jnp.float32)
    lengths = jnp.asarray(lengths, jnp.float32)
    if rewards.shape != lengths.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and lengths {tuple(lengths.shape)} must "
                         "be one shape [batch]")
    correct = rewards >= correct_threshold
    r_start = jnp.where(correct, correct_range[0], wrong_range[0])
    r_end = jnp.where(correct, correct_range[1], wrong_range[1])
    cos_t = jnp.cos(math.pi * jnp.minimum(lengths, max_length) / max_length)
    return r_end + (r_start - r_end) * (1.0 + cos_t) / 2.0
