"""Masked reductions and the aggregation of per-token losses over a mini-batch.

Aggregation modes (algorithm.md, "Aggregation of token_loss over the mini-batch"), for token
values v[i, t] and mask m[i, t] in {0, 1} of shape [batch, time]:

    token-mean               sum_{i,t} m v / sum_{i,t} m                     (DAPO, ProRL)
    seq-mean-token-mean      (1/S) sum_i [ sum_t m v / sum_t m ]             (original GRPO)
    seq-mean-token-sum       (1/S) sum_i [ sum_t m v ]
    seq-mean-token-sum-norm  sum_{i,t} m v / (batch * norm_len)              (Dr. GRPO)

S is the number of responses with at least one unmasked token (a response dropped whole, e.g. by
overlong filtering, does not dilute the others); `batch` in the last mode is all rows, so that
its normaliser is a constant, as Dr. GRPO intends.

Micro-batching: every mode is `numerator(values, mask) / denominator(mask)` where the numerator
is a sum over responses. Compute `denom = loss_denominator(mask_of_mini_batch, mode)` once,
pass it as `global_denominator` to each micro-batch, and the sum of the micro-batch losses is
the mini-batch loss (and so is the sum of their gradients).
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from prorl_jax.loss._checks import check_choice, check_ndim, check_same_shape, is_concrete_number

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def masked_sum(x, mask, axis=None):
    """sum(x * mask) over `axis`; masked positions contribute exactly 0 even if x is inf/NaN there.

    x, mask: same shape (mask bool or 0/1 float). Returns f32.
    """
    mask = jnp.asarray(mask)
    x = jnp.asarray(x, jnp.float32)
    return jnp.sum(jnp.where(mask != 0, x * mask.astype(jnp.float32), 0.0), axis=axis)


def masked_mean(x, mask, axis=None):
    """sum(x * mask) / max(sum(mask), 1) over `axis` (0 where everything is masked)."""
    count = jnp.sum(jnp.asarray(mask, jnp.float32), axis=axis)
    return masked_sum(x, mask, axis) / jnp.maximum(count, 1.0)


class TokenCounts(NamedTuple):
    """Counts of a (mini-)batch, for metrics that must sum correctly over micro-batches.

    num_tokens:          f32[], tokens in the loss (unmasked after any off-policy correction).
    num_positions:       f32[], all positions, batch * time.
    num_response_tokens: f32[], tokens of the loss mask before the correction (= num_tokens
                         without one).
    """
    num_tokens: jnp.ndarray
    num_positions: jnp.ndarray
    num_response_tokens: jnp.ndarray


def token_counts(mask, corrected_mask=None) -> TokenCounts:
    """TokenCounts of mask [batch, time] and, if given, the corrected loss mask [batch, time]."""
    mask = jnp.asarray(mask, jnp.float32)
    response = jnp.sum(mask)
    tokens = response if corrected_mask is None else jnp.sum(
        jnp.asarray(corrected_mask, jnp.float32))
    return TokenCounts(tokens, jnp.asarray(mask.size, jnp.float32), response)


def _check_mode_args(mask, mode: str, norm_len) -> None:
    check_choice("agg_mode", mode, AGG_MODES)
    check_ndim("mask", mask, 2, "[batch, time]")
    if is_concrete_number(norm_len) and not norm_len > 0:
        raise ValueError(f"norm_len must be a positive token count, got {norm_len!r}")


def loss_denominator(mask, mode: str, *, norm_len=None):
    """The normaliser of `mode` for mask [batch, time] (a whole mini-batch); f32[].

    token-mean: max(sum m, 1); seq-mean-token-mean and seq-mean-token-sum: max(S, 1) with S the
    responses with at least one unmasked token; seq-mean-token-sum-norm: batch * norm_len
    (norm_len defaults to time, the padded length; pass the fixed max response length).
    """
    _check_mode_args(mask, mode, norm_len)
    mask = jnp.asarray(mask, jnp.float32)
    if mode == "token-mean":
        return jnp.maximum(jnp.sum(mask), 1.0)
    if mode == "seq-mean-token-sum-norm":
        length = mask.shape[1] if norm_len is None else norm_len
        return jnp.asarray(mask.shape[0] * length, jnp.float32)
    num_responses = jnp.sum(jnp.any(mask != 0, axis=1).astype(jnp.float32))
    return jnp.maximum(num_responses, 1.0)


def loss_numerator(values, mask, mode: str):
    """The sum over responses that `loss_denominator` divides; f32[].

    seq-mean-token-mean: sum_i (sum_t m v / max(sum_t m, 1)); every other mode: sum_{i,t} m v.
    """
    check_choice("agg_mode", mode, AGG_MODES)
    if mode == "seq-mean-token-mean":
        return jnp.sum(masked_mean(values, mask, axis=1))
    return masked_sum(values, mask)


def aggregate_loss(values, mask, mode: str, *, norm_len=None, global_denominator=None):
    """Aggregate per-token values f32[batch, time] under mask [batch, time] into a scalar.

    Returns loss_numerator(values, mask, mode) / D with D = global_denominator if given (the
    mini-batch's `loss_denominator`, when this is one micro-batch of it), else
    loss_denominator(mask, mode, norm_len=norm_len).
    """
    values = jnp.asarray(values)
    mask = jnp.asarray(mask)
    check_same_shape(values=values, mask=mask)
    _check_mode_args(mask, mode, norm_len)
    if global_denominator is None:
        global_denominator = loss_denominator(mask, mode, norm_len=norm_len)
    return loss_numerator(values, mask, mode) / global_denominator
