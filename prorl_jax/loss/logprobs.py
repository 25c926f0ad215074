"""Per-token log-probs and entropies from final hidden states, without full logits.

For token s (any position of [batch, time]) with hidden state h_s, LM head W [hidden, vocab] and
z_s = (h_s @ W) / temperature (matmul in the inputs' dtype, f32 accumulation; f32 after that):

    logp_s    = z_s[target_s] - logsumexp(z_s)
    entropy_s = logsumexp(z_s) - sum_v p_v z_v          (= -sum_v p_v log p_v, p = softmax(z_s))

Tokens are processed about chunk_size at a time: a chunk is every row's next
max(1, chunk_size // batch) positions, [batch, positions], so the batch axis (sharded under data
parallelism) stays whole and each device computes only its own rows' logits. The forward is a
lax.map over chunks, the backward a lax.scan written out by hand (custom_vjp), so neither pass
holds more than one [batch, positions, vocab] block of logits: the full [batch * time, vocab]
would be ~10 GB in f32 for Qwen2's 151,936-entry vocabulary at 16k tokens. (Under data
parallelism each chunk's head gradient is all-reduced inside the scan: fewer, larger chunks
mean fewer reductions.) Per chunk the backward recomputes z and p and uses

    d logp_s / d z_s    = onehot(target_s) - p
    d entropy_s / d z_s = -p * (z_s - sum_v p_v z_v)

with dW = sum over chunks of h^T @ (dz / temperature), accumulated in f32 whatever W's dtype.
Reverse mode (jax.grad, jax.vjp) is supported; forward mode (jax.jvp) is not.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from prorl_jax.loss._checks import check_ndim, check_positive_int, is_concrete_number

DEFAULT_CHUNK_SIZE = 1024


def _tempered_logits(hidden, head_weight, temperature):
    """z f32[chunk, vocab] = (hidden [chunk, hidden] @ head_weight [hidden, vocab]) / T."""
    z = jnp.dot(hidden, head_weight, preferred_element_type=jnp.float32).astype(jnp.float32)
    return z / temperature


def _softmax_stats(z, targets):
    """Per row of z f32[chunk, vocab]: logsumexp(z), the target's z, and the mean of z under
    p = softmax(z); each f32[chunk] (p is recomputed inline, never stored)."""
    log_normaliser = jax.nn.logsumexp(z, axis=-1)
    target_z = jnp.take_along_axis(z, targets[:, None], axis=-1)[:, 0]
    mean_z = jnp.sum(jnp.exp(z - log_normaliser[:, None]) * z, axis=-1)
    return log_normaliser, target_z, mean_z


def _chunk_forward(hidden, head_weight, targets, temperature):
    """hidden [chunk, hidden], head_weight [hidden, vocab], targets int32[chunk] ->
    (logp f32[chunk], entropy f32[chunk])."""
    z = _tempered_logits(hidden, head_weight, temperature)
    log_normaliser, target_z, mean_z = _softmax_stats(z, targets)
    return target_z - log_normaliser, log_normaliser - mean_z


def _chunk_backward(hidden, head_weight, targets, temperature, g_logp, g_entropy):
    """Cotangents of one chunk: (d hidden [chunk, hidden] in hidden's dtype,
    d head_weight f32[hidden, vocab], d temperature f32[]).

    dz = g_logp * (onehot(target) - p) - g_entropy * p * (z - mean_z);  d logits = dz / T;
    d T = -sum_v dz_v z_v / T = -(g_logp * (z_target - mean_z) - g_entropy * var_p(z)) / T.
    """
    z = _tempered_logits(hidden, head_weight, temperature)
    log_normaliser, target_z, mean_z = _softmax_stats(z, targets)
    probs = jnp.exp(z - log_normaliser[:, None])
    var_z = jnp.sum(probs * (z - mean_z[:, None]) ** 2, axis=-1)
    is_target = jax.lax.broadcasted_iota(jnp.int32, z.shape, 1) == targets[:, None]
    dz = -probs * (g_logp[:, None] + g_entropy[:, None] * (z - mean_z[:, None]))
    dz = jnp.where(is_target, dz + g_logp[:, None], dz)
    d_logits = (dz / temperature).astype(jnp.result_type(hidden, head_weight))
    d_temperature = -jnp.sum(g_logp * (target_z - mean_z) - g_entropy * var_z) / temperature
    d_hidden = jnp.dot(d_logits, head_weight.T, preferred_element_type=jnp.float32)
    d_weight = jnp.dot(hidden.T, d_logits, preferred_element_type=jnp.float32)
    return d_hidden.astype(hidden.dtype), d_weight.astype(jnp.float32), d_temperature


@jax.custom_vjp
def _chunked_logprobs(chunked_hidden, head_weight, chunked_targets, temperature):
    """chunked_hidden [chunks, batch, positions, hidden], chunked_targets
    int32[chunks, batch, positions] -> (logp, entropy) f32[chunks, batch, positions]."""
    def one_chunk(xs):
        hidden, targets = xs
        logp, entropy = _chunk_forward(hidden.reshape(-1, hidden.shape[-1]), head_weight,
                                       targets.reshape(-1), temperature)
        return logp.reshape(targets.shape), entropy.reshape(targets.shape)
    return jax.lax.map(one_chunk, (chunked_hidden, chunked_targets))


def _chunked_logprobs_fwd(chunked_hidden, head_weight, chunked_targets, temperature):
    outputs = _chunked_logprobs(chunked_hidden, head_weight, chunked_targets, temperature)
    return outputs, (chunked_hidden, head_weight, chunked_targets, temperature)


def _chunked_logprobs_bwd(residuals, cotangents):
    chunked_hidden, head_weight, chunked_targets, temperature = residuals

    def step(carry, xs):
        d_weight, d_temperature = carry
        hidden, targets, g_logp, g_entropy = xs
        d_hidden, d_weight_chunk, d_temperature_chunk = _chunk_backward(
            hidden.reshape(-1, hidden.shape[-1]), head_weight, targets.reshape(-1), temperature,
            g_logp.reshape(-1), g_entropy.reshape(-1))
        return ((d_weight + d_weight_chunk, d_temperature + d_temperature_chunk),
                d_hidden.reshape(hidden.shape))

    zero = (jnp.zeros(head_weight.shape, jnp.float32), jnp.zeros((), jnp.float32))
    (d_weight, d_temperature), d_hidden = jax.lax.scan(
        step, zero, (chunked_hidden, chunked_targets, *cotangents))
    d_targets = np.zeros(chunked_targets.shape, dtype=jax.dtypes.float0)
    return (d_hidden, d_weight.astype(head_weight.dtype), d_targets,
            d_temperature.astype(temperature.dtype))


_chunked_logprobs.defvjp(_chunked_logprobs_fwd, _chunked_logprobs_bwd)


def _check_inputs(hidden, head_weight, targets, temperature, chunk_size) -> None:
    check_ndim("hidden", hidden, 3, "[batch, time, hidden]")
    check_ndim("head_weight", head_weight, 2, "[hidden, vocab]")
    check_ndim("targets", targets, 2, "[batch, time]")
    if hidden.shape[2] != head_weight.shape[0]:
        raise ValueError(f"head_weight must be [hidden={hidden.shape[2]}, vocab], "
                         f"got shape {tuple(head_weight.shape)}")
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"targets must be [batch, time] = {list(hidden.shape[:2])}, "
                         f"got shape {tuple(targets.shape)}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")
    check_positive_int("chunk_size", chunk_size, "tokens per chunk")
    if is_concrete_number(temperature) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    try:
        ids = np.asarray(targets)
    except jax.errors.TracerArrayConversionError:
        return   # traced (under jit): ids cannot be checked here
    if ids.size and (ids.min() < 0 or ids.max() >= head_weight.shape[1]):
        raise ValueError(f"targets must be token ids in [0, vocab={head_weight.shape[1]}), "
                         f"got range [{ids.min()}, {ids.max()}]")


def token_logprobs(hidden, head_weight, targets, *, temperature=1.0,
                   chunk_size: int = DEFAULT_CHUNK_SIZE):
    """log pi(target) and the entropy of pi at every position, chunked over tokens.

    hidden: [batch, time, hidden] final hidden states (any float dtype, e.g. bf16);
    head_weight: [hidden, vocab] (logits = hidden @ head_weight); targets: int[batch, time].
    Returns (logp f32[batch, time], entropy f32[batch, time]) of the tempered distribution
    softmax(logits / temperature); differentiable (reverse mode) w.r.t. hidden, head_weight and
    temperature. chunk_size: tokens per chunk, as max(1, chunk_size // batch) positions of every
    row (time is padded up to a multiple of that internally).
    """
    hidden, head_weight = jnp.asarray(hidden), jnp.asarray(head_weight)
    targets = jnp.asarray(targets)
    _check_inputs(hidden, head_weight, targets, temperature, chunk_size)
    batch, time, width = hidden.shape
    positions = max(1, min(int(chunk_size) // max(batch, 1), time))   # per row per chunk
    num_chunks = -(-time // positions)
    pad = num_chunks * positions - time
    # [batch, time, ...] -> [chunks, batch, positions, ...]: the batch axis (sharded under data
    # parallelism) stays whole, so each device computes only its own rows' logits.
    chunked_hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(
        batch, num_chunks, positions, width).swapaxes(0, 1)
    chunked_targets = jnp.pad(targets.astype(jnp.int32), ((0, 0), (0, pad))).reshape(
        batch, num_chunks, positions).swapaxes(0, 1)
    logp, entropy = _chunked_logprobs(chunked_hidden, head_weight, chunked_targets,
                                      jnp.asarray(temperature, jnp.float32))

    def unchunk(x):   # [chunks, batch, positions] -> [batch, time]
        return x.swapaxes(0, 1).reshape(batch, num_chunks * positions)[:, :time]
    return unchunk(logp), unchunk(entropy)
