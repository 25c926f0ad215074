"""Pure, jittable next-token sampling: temperature, exact nucleus (top-p), greedy, and the
log-prob of the chosen token under the *processed* distribution (what vLLM returns with
`--logprobs-mode processed_logprobs`, and what the trainer's importance ratio needs).

For logits z [batch, vocab], temperature T > 0 and top_p in (0, 1]:

    p        = softmax(z / T)                                   (the tempered distribution)
    nucleus  = the smallest set of most-probable tokens with sum_{v in nucleus} p_v >= top_p
               (top_p = 1 keeps every token; ties at the boundary are all kept)
    logp_v   = log p_v - log sum_{u in nucleus} p_u  for v in nucleus, -inf outside

Greedy decoding (T = 0) picks argmax z and, like vLLM, reports log-probs at T = 1 (with the same
nucleus truncation), since the T -> 0 distribution is a point mass.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def nucleus_mask(logp: jax.Array, top_p: jax.Array) -> jax.Array:
    """bool[batch, vocab]: True for the tokens in the top-p nucleus of each row.

    logp: float32[batch, vocab] normalised log-probs; top_p: scalar in (0, 1].
    Sorted descending, token k is kept iff the mass strictly before it is < top_p; every token
    at least as probable as the least probable kept one is kept (so ties are not split).
    """
    sorted_logp = jnp.sort(logp, axis=-1)[..., ::-1]
    sorted_p = jnp.exp(sorted_logp)
    mass_before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
    num_kept = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(sorted_logp, num_kept - 1, axis=-1)
    return logp >= threshold


def processed_logprobs(logits: jax.Array, temperature: jax.Array,
                       top_p: jax.Array) -> jax.Array:
    """float32[batch, vocab]: log-probs of the tempered, top-p-truncated distribution.

    logits [batch, vocab]; temperature scalar (0 means greedy: T = 1 is used here);
    top_p scalar in (0, 1]. Tokens outside the nucleus get -inf. The sort behind the nucleus is
    skipped (lax.cond) when top_p >= 1.
    """
    temperature = jnp.asarray(temperature, jnp.float32)
    safe_t = jnp.where(temperature > 0, temperature, 1.0)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / safe_t, axis=-1)

    def truncate(lp):
        kept = nucleus_mask(lp, top_p)
        return jax.nn.log_softmax(jnp.where(kept, lp, -jnp.inf), axis=-1)

    return jax.lax.cond(jnp.asarray(top_p) < 1.0, truncate, lambda lp: lp, logp)


def sample_tokens(row_keys: jax.Array, logits: jax.Array, temperature: jax.Array,
                  top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Draws one token per row; returns (tokens int32[batch], logp float32[batch]).

    row_keys: one PRNG key per row [batch]; logits [batch, vocab]. Sampling is Gumbel-max on the
    processed log-probs (exactly categorical(processed)); temperature 0 takes argmax(logits).
    logp is the processed log-prob of the returned token (see `processed_logprobs`).
    """
    logp = processed_logprobs(logits, temperature, top_p)
    sampled = jax.vmap(jax.random.categorical)(row_keys, logp)
    greedy = jnp.argmax(logits, axis=-1)
    tokens = jnp.where(jnp.asarray(temperature) > 0, sampled, greedy).astype(jnp.int32)
    token_logp = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    return tokens, token_logp


def row_step_keys(base_key: jax.Array, row_ids: jax.Array, steps: jax.Array) -> jax.Array:
    """One PRNG key per row: fold_in(fold_in(base_key, row_ids[b]), steps[b]).

    Token t of row r always uses the same key whatever slot, batch, shard or loop step it is
    computed in, so a seed reproduces a row's samples under any batching or sharding.
    row_ids, steps: int32[batch] -> keys [batch].
    """
    return jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(base_key, r), t))(
        row_ids, steps)
