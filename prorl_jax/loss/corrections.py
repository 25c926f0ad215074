"""Off-policy corrections for the sampler/trainer gap (algorithm.md, "Off-policy corrections").

The sampler's log-probs (vLLM in bf16, another engine, an older weight version) differ from the
trainer's. With sampler_logp the engine's log-probs of the sampled tokens and old_logp the
trainer's (recomputed under the weights the update starts from), per token

    d = clip(old_logp - sampler_logp, -20, 20),    r_is = exp(d)

and a correction `kind` (config `loss.correction`) turns them into a token weight and a mask:

    none      weight 1, mask unchanged
    tis       truncated importance sampling: weight = min(r_is, high)          (e.g. high = 2)
    icepop    weight 1, mask = mask * [low <= r_is <= high]                   (ProRL v2: [0.5, 5])
    seq_mask  per response b: g_b = exp(sum_t m d / max(sum_t m, 1)) (the geometric mean ratio);
              weight 1, mask = mask * [low <= g_b <= high] on all of b's tokens (e.g. [0.999, 1.002])

In the loss the policy term becomes weight * pg and the corrected mask is the loss mask: a
rejected token leaves the numerator and the denominator (as verl's rejection masks do), so the
denominator of a mini-batch must be computed from the corrected mask of the whole mini-batch
(`objective.loss_normalizers`). Both outputs are constants (no gradient). Every kind is row-local
(a token's or a row's own values), so correcting a micro-batch equals slicing the corrected
mini-batch. A new kind is one function `(d, mask, low, high) -> (weight, mask)` and one entry in
CORRECTIONS naming the bounds it takes.

Metrics (`mismatch_k3` etc. in compute_loss): the fraction of loss tokens masked, the mean weight,
and the mismatch mean |d| and k3 = exp(d) - d - 1 (the k3 estimate of KL(sampler || trainer) from
the sampler's tokens).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from prorl_jax.loss._checks import check_choice, check_ndim, check_same_shape, is_concrete_number
from prorl_jax.loss._ops import clamp

LOG_RATIO_CLAMP = 20.0


def sampler_log_ratio(old_logp, sampler_logp):
    """d = clip(old_logp - sampler_logp, -20, 20), f32[batch, time], a constant (stop_gradient)."""
    diff = jnp.asarray(old_logp, jnp.float32) - jnp.asarray(sampler_logp, jnp.float32)
    return jax.lax.stop_gradient(clamp(diff, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def _none(d, mask, low, high):
    return jnp.ones_like(mask), mask


def _tis(d, mask, low, high):
    return jnp.minimum(jnp.exp(d), high), mask


def _icepop(d, mask, low, high):
    r_is = jnp.exp(d)
    return jnp.ones_like(mask), mask * ((r_is >= low) & (r_is <= high))


def _seq_mask(d, mask, low, high):
    count = jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)
    g = jnp.exp(jnp.sum(jnp.where(mask != 0, d, 0.0) * mask, axis=1, keepdims=True) / count)
    return jnp.ones_like(mask), mask * ((g >= low) & (g <= high))


class Correction(NamedTuple):
    """One kind: apply(d, mask, low, high) -> (weight, mask); bounds: which of low/high it takes."""
    apply: Callable
    bounds: tuple[str, ...]


CORRECTIONS: dict[str, Correction] = {
    "none": Correction(_none, ()),
    "tis": Correction(_tis, ("high",)),
    "icepop": Correction(_icepop, ("low", "high")),
    "seq_mask": Correction(_seq_mask, ("low", "high")),
}


def _check_bounds(kind: str, low, high) -> None:
    given = {"low": low, "high": high}
    wanted = CORRECTIONS[kind].bounds
    for name, value in given.items():
        if (name in wanted) != (value is not None):
            need = (f"needs {' and '.join(wanted)}" if wanted else "takes no bounds")
            raise ValueError(f"importance_correction(kind={kind!r}) {need} (bounds on r_is), "
                             f"got low={low!r}, high={high!r}")
        if is_concrete_number(value) and not value > 0:
            raise ValueError(f"importance_correction(kind={kind!r}): {name} must be > 0 "
                             f"(a bound on r_is = exp(d)), got {value!r}")
    if is_concrete_number(low) and is_concrete_number(high) and low > high:
        raise ValueError(f"importance_correction(kind={kind!r}): low={low!r} > high={high!r}")


def importance_correction(old_logp, sampler_logp, mask, *, kind: str, low=None, high=None):
    """(weight f32[batch, time], mask f32[batch, time]) of correction `kind` (module doc).

    old_logp, sampler_logp: f32[batch, time] (sampler_logp may be None for kind "none"); mask:
    [batch, time] (bool or 0/1), the loss mask before the correction. low / high: the bounds the
    kind takes (CORRECTIONS[kind].bounds), None otherwise. Jittable (kind static); both outputs
    carry no gradient.
    """
    check_choice("correction", kind, tuple(CORRECTIONS))
    _check_bounds(kind, low, high)
    mask = jnp.asarray(mask, jnp.float32)
    check_ndim("mask", mask, 2, "[batch, time]")
    if kind == "none" and sampler_logp is None:
        return jnp.ones_like(mask), mask
    if sampler_logp is None:
        raise ValueError(f"importance_correction(kind={kind!r}) needs sampler_logp [batch, time] "
                         "(the engine's log-probs of the sampled tokens)")
    check_same_shape(old_logp=jnp.asarray(old_logp), sampler_logp=jnp.asarray(sampler_logp),
                     mask=mask)
    d = sampler_log_ratio(old_logp, sampler_logp)
    weight, corrected = CORRECTIONS[kind].apply(d, mask, low, high)
    return jax.lax.stop_gradient((weight.astype(jnp.float32), corrected.astype(jnp.float32)))
