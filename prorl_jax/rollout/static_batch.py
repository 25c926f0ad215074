"""The embedded sampler's static path: every row of a call in one batch until the longest is done.

Per call (P prompts, n samples each, B = P_bucket * n decode rows):
  1. Prefill [P_bucket, Tb] once (left-padded prompts), then repeat each prompt's KV cache and
     last logits n times (prompt-major rows) into a dense cache of S_max = Tb + max_new_tokens
     slots, one buffer per layer so each step updates it in place.
  2. A jitted `lax.while_loop` samples a token per row, records its processed log-prob, feeds it
     back through the cached decoder and stops when every row has emitted a stop id or
     max_new_tokens. Every step attends all S_max slots of all B rows, finished or not.
Kept for comparison with the continuous path (`continuous_batch.py`) and as a fallback.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from prorl_jax.models.kv_cache import DenseKVCache
from prorl_jax.rollout.sampling import row_step_keys, sample_tokens


class StaticBatcher:
    """The static path of `JaxSampler` (`engine`: its model, mesh and bucket settings)."""

    def __init__(self, engine):
        self.engine = engine
        self.prefill_jit = jax.jit(self._prefill, static_argnames=("n", "max_new_tokens"))
        # the prefill's cache is donated to the decode loop, which updates it in place
        self.decode_jit = jax.jit(self._decode, static_argnames=("prompt_len",),
                                  donate_argnames=("ks", "vs"))

    def _prefill(self, params, prompt_ids, prompt_lens, *, n: int, max_new_tokens: int):
        """prompt_ids int32[P, Tb] (left-padded), prompt_lens int32[P] ->
        (logits f32[P*n, V], ks, vs: L-tuples of [P*n, Tb + max_new_tokens, K, D],
         kv_valid bool[P*n, Tb + max_new_tokens])."""
        e = self.engine
        e.trace_counts["prefill"] += 1
        model = e.model_with(params)
        num_prompts, prompt_len = prompt_ids.shape
        slots = jnp.arange(prompt_len, dtype=jnp.int32)[None, :]
        first_slot = (prompt_len - prompt_lens)[:, None]
        valid = slots >= first_slot
        positions = jnp.maximum(slots - first_slot, 0)
        cache = model.init_cache(num_prompts, prompt_len, dtype=e.cache_dtype)
        hidden, cache = model.decode(prompt_ids, positions, cache.replace(valid=valid))
        logits = model.logits(hidden[:, -1:])[:, 0]

        def expand(x, fill=0):  # [P, Tb, ...] -> [P*n, Tb + max_new, ...], prompt-major rows
            pad = [(0, 0), (0, max_new_tokens)] + [(0, 0)] * (x.ndim - 2)
            return e.shard_batch(jnp.repeat(jnp.pad(x, pad, constant_values=fill), n, axis=0))

        ks = tuple(expand(k) for k in cache.k)
        vs = tuple(expand(v) for v in cache.v)
        # generated slots are valid once written; causality hides the later ones
        return (e.shard_batch(jnp.repeat(logits, n, axis=0)), ks, vs, expand(valid, True))

    def _decode(self, params, logits, ks, vs, kv_valid, prompt_lens, row_ids, done, stop_ids,
                sampling, seed, *, prompt_len: int):
        """The decode loop. logits f32[B, V]; prompt_lens int32[B]; row_ids int32[B] (global
        sample index, the RNG stream); done bool[B] (True for filler rows); stop_ids int32[S]
        (-1 = unused); sampling f32[2] = (temperature, top_p); seed uint32 scalar.
        Returns ((tokens int32[B, M], logprobs f32[B, M], lengths int32[B], stopped bool[B],
        steps int32), (ks, vs)) with M = max_new_tokens = the cache's free slots (entries past
        lengths are junk); the final cache is returned so the donated one is reused in place."""
        e = self.engine
        e.trace_counts["decode"] += 1
        model = e.model_with(params)
        batch, cache_len = kv_valid.shape
        max_new = cache_len - prompt_len
        temperature, top_p = sampling[0], sampling[1]
        base_key = jax.random.key(seed)

        def body(state):
            step, tokens, logps, lengths, done, stopped, logits, ks, vs = state
            keys = row_step_keys(base_key, row_ids, jnp.full((batch,), step, jnp.int32))
            token, token_logp = sample_tokens(keys, logits, temperature, top_p)
            active = ~done
            tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
            logps = jax.lax.dynamic_update_slice(logps, token_logp[:, None], (0, step))
            lengths = lengths + active.astype(jnp.int32)
            hit_stop = active & jnp.any(token[:, None] == stop_ids[None, :], axis=-1)
            stopped = stopped | hit_stop
            done = done | hit_stop | (step + 1 >= max_new)
            cache = DenseKVCache(ks, vs, jnp.int32(prompt_len) + step, kv_valid)
            hidden, cache = model.decode(token[:, None], (prompt_lens + step)[:, None], cache)
            logits = e.shard_batch(model.logits(hidden)[:, 0])
            return step + 1, tokens, logps, lengths, done, stopped, logits, cache.k, cache.v

        def cond(state):
            return (state[0] < max_new) & ~jnp.all(state[4])

        init = (jnp.int32(0), e.shard_batch(jnp.zeros((batch, max_new), jnp.int32)),
                e.shard_batch(jnp.zeros((batch, max_new), jnp.float32)),
                jnp.zeros((batch,), jnp.int32), done, jnp.zeros((batch,), bool), logits, ks, vs)
        step, tokens, logps, lengths, _, stopped, _, ks, vs = jax.lax.while_loop(cond, body, init)
        return (tokens, logps, lengths, stopped, step), (ks, vs)

    def generate(self, prompts, *, n, temperature, top_p, max_new_tokens, stop_ids, seed):
        """-> (token lists, log-prob arrays, stopped bool[P*n], stats dict); see the module doc."""
        e = self.engine
        start = time.perf_counter()
        num_prompts = len(prompts)
        prompt_len = e.prompt_bucket(max(len(p) for p in prompts))
        num_rows = e.prompt_count_bucket(num_prompts)
        ids, lens = e.left_pad(prompts, num_rows, prompt_len)
        logits, ks, vs, kv_valid = self.prefill_jit(
            e.params, e.put_batch(ids), e.put_batch(lens), n=n, max_new_tokens=max_new_tokens)
        jax.block_until_ready(logits)
        prefill_s = time.perf_counter() - start
        batch = num_rows * n
        out, _ = self.decode_jit(
            e.params, logits, ks, vs, kv_valid, e.put_batch(np.repeat(lens, n)),
            e.put_batch(np.arange(batch, dtype=np.int32)),
            e.put_batch(np.arange(batch) >= num_prompts * n), jnp.asarray(stop_ids),
            jnp.asarray([temperature, top_p], jnp.float32),
            jnp.asarray(seed % 2**32, jnp.uint32), prompt_len=prompt_len)
        tokens, logps, lengths, stopped, steps = e.fetch(out)
        rows = range(num_prompts * n)
        stats = {"prefill_s": prefill_s, "decode_steps": int(steps), "slots": batch,
                 "slot_steps": int(steps) * batch,
                 "kv_slots_read": int(steps) * batch * (prompt_len + max_new_tokens)}
        return ([tokens[r, :lengths[r]].tolist() for r in rows],
                [logps[r, :lengths[r]].astype(np.float32) for r in rows], stopped[:len(rows)],
                stats)
