"""The embedded sampler's continuous path: S decode slots over a paged KV pool, refilled as rows
finish (the host-side bookkeeping is `scheduler.SlotScheduler`).

One call loops on the host:
  1. admit waiting (prompt, sample) rows into free slots; prefill the prompts new to a shard
     (prompt[:-1] only, written into the pool once and shared by that prompt's samples);
  2. one jitted decode chunk: a `lax.while_loop` of at most chunk_steps steps over the S slots;
     each step writes every live slot's input token into its own blocks, attends only its
     blocks [0, C) (C: the longest live row's blocks, bucketed to a power of two), samples,
     and retires rows on a stop id or max_new_tokens; the loop returns early once enough slots
     are free to refill (rows waiting) or to compact into a smaller slot bucket (none waiting);
  3. append the chunk's tokens, free finished rows' blocks, compact.
Compiled shapes: the prefill per (prompt rows bucket, prompt length bucket), the chunk per
(slot bucket, context bucket): a few, reused across calls; nothing depends on the step.
Sampling per row and token is that of the static path (same keys, same processed log-probs).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from prorl_jax.rollout.paged_kv import TRASH_BLOCK, ChunkKVCache, PagedKVCache, zero_pages
from prorl_jax.rollout.sampling import row_step_keys, sample_tokens
from prorl_jax.rollout.scheduler import SlotScheduler, blocks_for, decode_slots, row_bytes

REFILL_FRACTION = 1 / 16  # return to refill once this fraction of the slots (at least 1) is free


class ContinuousBatcher:
    """The continuous path of `JaxSampler` (`engine`: its model, mesh and settings)."""

    def __init__(self, engine):
        self.engine = engine
        self.prefill_jit = jax.jit(self._prefill, donate_argnames=("pages",))
        self.chunk_jit = jax.jit(self._chunk, donate_argnames=("pages",),
                                 static_argnames=("chunk_steps",))

    def _cache(self, pages, block_table, write_slot, kv_start) -> PagedKVCache:
        e = self.engine
        return PagedKVCache(pages[0], pages[1], block_table, write_slot, kv_start,
                            mesh=e.mesh, batch_axes=e.batch_axes)

    # -- jitted phases --------------------------------------------------------------------------

    def _prefill(self, params, pages, ids, positions, write_slot, block_table, kv_start):
        """Writes prompts' keys/values into the pool: ids, positions, write_slot int32[Pb, Tb],
        block_table int32[Pb, Tb / block_size], kv_start int32[Pb] -> the pages."""
        e = self.engine
        e.trace_counts["paged_prefill"] += 1
        model = e.model_with(params)
        _, cache = model.decode(ids, positions, self._cache(pages, block_table, write_slot,
                                                            kv_start))
        return cache.k, cache.v

    def _chunk(self, params, pages, block_table, read_table, kv_start, ctx_len, input_tok,
               position, row_id, steps_done, active, stop_ids, sampling, seed, max_new,
               exit_free, compact_live, *, chunk_steps: int):
        """At most chunk_steps decode steps over S slots (see the module doc). Slot arrays
        [S] as in `scheduler.ChunkPlan` (read_table: block_table's first C columns); sampling
        f32[2] = (temperature, top_p); max_new, exit_free, compact_live int32 scalars. Returns
        ((tokens int32[S, K], logps f32[S, K], steps_done, active, stopped bool[S], steps,
        live row-steps, attended kv slots), pages)."""
        e, c = self.engine, self.engine.config
        e.trace_counts["chunk"] += 1
        model = e.model_with(params)
        slots = active.shape[0]
        temperature, top_p = sampling[0], sampling[1]
        base_key = jax.random.key(seed)
        buffer = e.shard_batch(jnp.zeros((slots, chunk_steps, c.num_key_value_heads, c.head_dim),
                                         e.cache_dtype))
        layers = range(c.num_hidden_layers)
        cache = ChunkKVCache(pages[0], pages[1], tuple(buffer for _ in layers),
                             tuple(buffer for _ in layers), read_table, kv_start, ctx_len,
                             jnp.zeros_like(ctx_len), mesh=e.mesh, batch_axes=e.batch_axes)

        def body(state):
            (step, tokens, logps, input_tok, position, steps_done, active, stopped, live,
             attended, chunk_k, chunk_v) = state
            step_cache = cache.replace(chunk_k=chunk_k, chunk_v=chunk_v,
                                       step=jnp.full_like(ctx_len, step))
            hidden, step_cache = model.decode(input_tok[:, None], position[:, None], step_cache)
            logits = e.shard_batch(model.logits(hidden)[:, 0])
            keys = row_step_keys(base_key, row_id, steps_done)
            token, token_logp = sample_tokens(keys, logits, temperature, top_p)
            tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
            logps = jax.lax.dynamic_update_slice(logps, token_logp[:, None], (0, step))
            hit_stop = active & jnp.any(token[:, None] == stop_ids[None, :], axis=-1)
            grow = active.astype(jnp.int32)
            live = live + jnp.sum(grow)
            attended = attended + jnp.sum(grow * (ctx_len + step - kv_start + 1))
            steps_done = steps_done + grow
            finished = hit_stop | (steps_done >= max_new)
            return (step + 1, tokens, logps, jnp.where(active, token, input_tok),
                    position + grow, steps_done, active & ~finished, stopped | hit_stop, live,
                    attended, step_cache.chunk_k, step_cache.chunk_v)

        def cond(state):
            step, active = state[0], state[6]
            free = slots - jnp.sum(active.astype(jnp.int32))
            shard_live = jnp.max(jnp.sum(active.reshape(e.num_batch_shards, -1), axis=1))
            keep_going = (free < exit_free) & (shard_live > compact_live)
            return (step < chunk_steps) & jnp.any(active) & ((step == 0) | keep_going)

        zero = jnp.zeros((), jnp.int32)
        init = (zero, e.shard_batch(jnp.zeros((slots, chunk_steps), jnp.int32)),
                e.shard_batch(jnp.zeros((slots, chunk_steps), jnp.float32)), input_tok,
                position, steps_done, active, jnp.zeros_like(active), zero, zero,
                cache.chunk_k, cache.chunk_v)
        (steps, tokens, logps, _, _, new_done, active, stopped, live, attended, chunk_k,
         chunk_v) = jax.lax.while_loop(cond, body, init)
        pages = cache.replace(chunk_k=chunk_k, chunk_v=chunk_v).flush(block_table,
                                                                       new_done - steps_done)
        return (tokens, logps, new_done, active, stopped, steps, live, attended), pages

    # -- the host loop --------------------------------------------------------------------------

    def _new_pages(self, num_blocks: int):
        e, c = self.engine, self.engine.config
        args = (c.num_hidden_layers, num_blocks, e.batching.block_size, c.num_key_value_heads,
                c.head_dim, e.cache_dtype)
        if e.mesh is None:
            return zero_pages(*args)
        sharding = NamedSharding(e.mesh, PartitionSpec(e.batch_axes))
        return jax.jit(lambda: zero_pages(*args), out_shardings=sharding)()

    def _prefill_arrays(self, sched: SlotScheduler, prefills) -> list[np.ndarray]:
        """Host arrays of one prefill call: each prompt in a row of its shard's part."""
        e, bs, shards = self.engine, sched.bs, sched.shards
        counts = np.bincount([p.shard for p in prefills], minlength=shards)
        per_shard = max(e.prompt_count_bucket(int(counts.max()), per_shard=True),
                        sched.per_shard // 8)  # a few prefill shapes, not one per count
        width = min(b for b in self.prefill_buckets(sched) if b >= max(
            sched.aligned[p.prompt] for p in prefills))
        rows = shards * per_shard
        ids = np.full((rows, width), e.pad_id, np.int32)
        positions = np.zeros((rows, width), np.int32)
        write_slot = np.full((rows, width), -1, np.int32)
        table = np.full((rows, width // bs), TRASH_BLOCK, np.int32)
        kv_start = np.zeros(rows, np.int32)
        used = [0] * shards
        for p in prefills:
            r = p.shard * per_shard + used[p.shard]
            used[p.shard] += 1
            tokens, aligned = sched.prompts[p.prompt][:-1], sched.aligned[p.prompt]
            ids[r, width - len(tokens):] = tokens
            positions[r, width - len(tokens):] = np.arange(len(tokens))
            write_slot[r, width - aligned:] = np.arange(aligned)
            table[r, :len(p.blocks)] = p.blocks
            kv_start[r] = aligned - len(tokens)
        return [ids, positions, write_slot, table, kv_start]

    def prefill_buckets(self, sched: SlotScheduler) -> list[int]:
        """Prefill widths: the prompt buckets' lengths minus one, rounded up to whole blocks."""
        bs = sched.bs
        return sorted({max(bs, blocks_for(b - 1, bs) * bs) for b in self.engine.prompt_buckets})

    def scheduler_for(self, prompts, n: int, max_new_tokens: int) -> SlotScheduler:
        """The call's scheduler: slot count and pool size from the batching config."""
        e, c, cfg = self.engine, self.engine.config, self.engine.batching
        shards, bs = e.num_batch_shards, cfg.block_size
        worst = row_bytes(c.num_hidden_layers, c.num_key_value_heads, c.head_dim,
                          e.cache_dtype.itemsize, e.max_prompt_len, max_new_tokens, bs)
        slots = decode_slots(cfg, e.prompt_count_bucket(len(prompts)) * n, shards, worst)
        return SlotScheduler(
            prompts, n, max_new_tokens, slots=slots, shards=shards, block_size=bs,
            blocks_per_shard=SlotScheduler.pool_blocks_per_shard(
                slots // shards, e.max_prompt_len, max_new_tokens, bs),
            min_slots=cfg.min_slots, chunk_steps=min(cfg.chunk_steps, max_new_tokens),
            max_row_blocks=blocks_for(e.max_prompt_len - 1, bs) + blocks_for(max_new_tokens, bs))

    def generate(self, prompts, *, n, temperature, top_p, max_new_tokens, stop_ids, seed):
        """-> (token lists, log-prob arrays, stopped bool[P*n], stats dict)."""
        e = self.engine
        sched = self.scheduler_for(prompts, n, max_new_tokens)
        pages = self._new_pages(sched.shards * (sched.capacity + 1))
        scalars = (jnp.asarray(stop_ids), jnp.asarray([temperature, top_p], jnp.float32),
                   jnp.asarray(seed % 2**32, jnp.uint32), jnp.int32(max_new_tokens))
        stats = dict(prefill_s=0.0, decode_steps=0, slot_steps=0, kv_slots_read=0,
                     live_row_steps=0, kv_slots_attended=0, chunks=0, prefills=0,
                     prompts_prefilled=0, compactions=0, slots=sched.num_slots,
                     kv_pool_bytes=sched.shards * (sched.capacity + 1) * sched.bs
                     * e.kv_bytes_per_slot)
        while not sched.done:
            prefills = sched.admit()
            if prefills:
                start = time.perf_counter()
                arrays = [e.put_batch(a) for a in self._prefill_arrays(sched, prefills)]
                pages = self.prefill_jit(e.params, pages, *arrays)
                jax.block_until_ready(pages)
                stats["prefill_s"] += time.perf_counter() - start
                stats["prefills"] += 1
                stats["prompts_prefilled"] += len(prefills)
            plan = sched.plan_chunk(max(1, int(sched.num_slots * REFILL_FRACTION)))
            if not plan.active.any():
                raise RuntimeError("continuous batching: rows wait but none can be admitted "
                                   "(the KV pool is too small for one row)")
            slot_arrays = [e.put_batch(a) for a in (
                plan.block_table, plan.block_table[:, :plan.read_blocks], plan.kv_start,
                plan.ctx_len, plan.input_tok, plan.position, plan.row_id, plan.steps_done,
                plan.active)]
            out, pages = self.chunk_jit(e.params, pages, *slot_arrays, *scalars,
                                        jnp.int32(plan.exit_free), jnp.int32(plan.compact_live),
                                        chunk_steps=sched.chunk_steps)
            tokens, logps, steps_done, active, stopped, steps, live, attended = e.fetch(out)
            sched.record_chunk(tokens, logps, steps_done, active, stopped)
            stats["chunks"] += 1
            stats["decode_steps"] += int(steps)
            stats["slot_steps"] += int(steps) * sched.num_slots
            # per step each slot gathers its C context blocks and reads the chunk buffer
            stats["kv_slots_read"] += int(steps) * sched.num_slots * (
                plan.read_blocks * sched.bs + sched.chunk_steps)
            stats["live_row_steps"] += int(live)
            stats["kv_slots_attended"] += int(attended)
            stats["compactions"] += sched.compact()
        return (sched.tokens, [np.asarray(lp, np.float32) for lp in sched.logps], sched.stopped,
                stats)
