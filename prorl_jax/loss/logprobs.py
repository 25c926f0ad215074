"""Per-token log-probs and entropies from final hidden states, without full logits.

For token s (flattened over [batch, time]) with hidden state h_s and LM head W [hidden, vocab]:

    z_s      = (h_s @ W) / temperature                    (f32 accumulation, f32 division)
    logp_s   = z_s[target_s] - logsumexp(z_s)
    entropy_s = logsumexp(z_s) - sum_v softmax(z_s)_v * z_s,v   (= -sum_v p_v log p_v)

The tokens are processed chunk_size at a time by a lax.map whose body is wrapped in
jax.checkpoint, so neither the forward nor the backward pass holds more than one
[chunk_size, vocab] block of logits (the full [batch * time, vocab] would be ~10 GB in f32 for
Qwen2's 151,936-entry vocabulary at 16k tokens).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from prorl_jax.loss._checks import check_ndim, is_concrete_number

DEFAULT_CHUNK_SIZE = 1024


@jax.checkpoint
def _chunk_logprobs(hidden, head_weight, targets, temperature):
    """hidden [chunk, hidden], head_weight [hidden, vocab], targets int32[chunk] ->
    (logp f32[chunk], entropy f32[chunk])."""
    logits = jnp.dot(hidden, head_weight, preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.float32) / temperature
    log_normaliser = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    probs = jnp.exp(logits - log_normaliser[:, None])
    entropy = log_normaliser - jnp.sum(probs * logits, axis=-1)
    return target_logits - log_normaliser, entropy


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
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (tokens per chunk), got {chunk_size!r}")
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
    softmax(logits / temperature); differentiable w.r.t. hidden and head_weight.
    """
    hidden, head_weight, targets = jnp.asarray(hidden), jnp.asarray(head_weight), jnp.asarray(targets)
    _check_inputs(hidden, head_weight, targets, temperature, chunk_size)
    batch, time, width = hidden.shape
    num_tokens = batch * time
    chunk = max(1, min(chunk_size, num_tokens))
    num_chunks = -(-num_tokens // chunk)
    pad = num_chunks * chunk - num_tokens
    flat_hidden = jnp.pad(hidden.reshape(num_tokens, width), ((0, pad), (0, 0)))
    flat_targets = jnp.pad(targets.reshape(num_tokens).astype(jnp.int32), (0, pad))

    def one_chunk(xs):
        chunk_hidden, chunk_targets = xs
        return _chunk_logprobs(chunk_hidden, head_weight, chunk_targets, temperature)

    logp, entropy = jax.lax.map(
        one_chunk, (flat_hidden.reshape(num_chunks, chunk, width),
                    flat_targets.reshape(num_chunks, chunk)))
    logp = logp.reshape(-1)[:num_tokens].reshape(batch, time)
    entropy = entropy.reshape(-1)[:num_tokens].reshape(batch, time)
    return logp, entropy
