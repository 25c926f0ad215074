"""A paged key/value cache: fixed-size blocks in one pool per layer, a block table per row.

Each row (a decode slot, or a prompt being prefilled) sees a *virtual* sequence of slots
0, 1, 2, ...; virtual slot v lives in block block_table[row, v // block_size] at offset
v % block_size. Rows may share blocks (a prompt's blocks are shared by its n samples) and
attention gathers only the row's first C blocks (C = the block table's width, chosen by the
caller to cover the longest live row), not a preallocated maximum.

Two views implement `protocol.KVCache`:
  PagedKVCache: writes the new tokens into the pool, then attends (the prefill: T tokens a row).
  ChunkKVCache: a decode chunk of up to K steps; the pool is read-only during the chunk and
      each step's keys/values go into a dense [S, K] chunk buffer at the step index (one
      in-place slice update, where a scatter into the pool per step and layer would cost far
      more); attention reads the row's blocks (its context before the chunk) and the chunk
      buffer up to the current step; `flush` writes the chunk into the pool once at its end.

Pages: per layer k, v of [num_blocks, block_size, K, D]. With a mesh, the pool is split over the
batch axes like the rows: shard h owns blocks [h * B_h, (h + 1) * B_h) and its rows index them
locally (0 .. B_h - 1); every operation runs per shard under `shard_map`, so no block ever
moves between devices. Local block 0 of every shard is the trash block: writes of padding
tokens go there, and block-table entries past a row's blocks point there (masked).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from prorl_jax.models.layers import attention

TRASH_BLOCK = 0


def zero_pages(num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
               head_dim: int, dtype: Any) -> tuple[tuple, tuple]:
    """(k, v): L-tuples of zeroed [num_blocks, block_size, K, D] pools."""
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return (tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)))


def write_pages(pages_k, pages_v, k, v, block_table, write_slot):
    """One shard: scatters k, v [B, T, K, D] into the pool at the rows' virtual slots
    write_slot [B, T] (< 0: the trash block) -> (pages_k, pages_v)."""
    bs = pages_k.shape[1]
    rows = jnp.arange(block_table.shape[0])[:, None]
    slot = jnp.maximum(write_slot, 0)
    block = jnp.where(write_slot >= 0, block_table[rows, slot // bs], TRASH_BLOCK)
    offset = jnp.where(write_slot >= 0, slot % bs, 0)
    return (pages_k.at[block, offset].set(k.astype(pages_k.dtype)),
            pages_v.at[block, offset].set(v.astype(pages_v.dtype)))


def gather_blocks(pages, block_table):
    """One shard: the rows' blocks [B, C] -> their virtual slots [B, C * block_size, K, D]."""
    b, c = block_table.shape
    return pages[block_table].reshape(b, c * pages.shape[1], *pages.shape[2:])


def _per_shard(fn, mesh: Optional[Mesh], batch_axes: Sequence[str], num_in: int, num_out: int):
    """fn itself without a mesh; else fn on each shard's rows and blocks (dim 0 of every input
    and output split over batch_axes)."""
    if mesh is None:
        return fn
    rows = PartitionSpec(tuple(batch_axes))
    return jax.shard_map(fn, mesh=mesh, in_specs=(rows,) * num_in,
                         out_specs=(rows,) * num_out, check_vma=False)


def _prefill_attend(pages_k, pages_v, q, k, v, block_table, write_slot, kv_start):
    """Writes, then query t of row b attends virtual slots kv_start[b] <= s <= write_slot[b, t]
    (a padding query, write_slot < 0, attends none)."""
    pages_k, pages_v = write_pages(pages_k, pages_v, k, v, block_table, write_slot)
    keys, values = gather_blocks(pages_k, block_table), gather_blocks(pages_v, block_table)
    s = jnp.arange(keys.shape[1], dtype=jnp.int32)[None, None, :]
    mask = (s >= kv_start[:, None, None]) & (s <= write_slot[:, :, None])  # [B, T, S]
    return attention(q, keys, values, mask[:, None]), pages_k, pages_v


@flax.struct.dataclass
class PagedKVCache:
    """Write-then-attend view of the pool for one `model.decode` call (the prefill).

    k, v:        L-tuples of [num_blocks, block_size, K, D] pages (all shards).
    block_table: int32[B, C]: row b's virtual block j is local block block_table[b, j].
    write_slot:  int32[B, T]: the virtual slot of each new token (< 0: padding, not kept).
    kv_start:    int32[B]: the row's first real virtual slot (earlier ones are alignment
                 padding of its prompt and never attended).
    mesh / batch_axes: shard rows and pages over these axes (None: one device).
    """
    k: tuple
    v: tuple
    block_table: jax.Array
    write_slot: jax.Array
    kv_start: jax.Array
    mesh: Optional[Mesh] = flax.struct.field(pytree_node=False, default=None)
    batch_axes: Sequence[str] = flax.struct.field(pytree_node=False, default=())

    def attend(self, layer: int, q: jax.Array, k: jax.Array,
               v: jax.Array) -> tuple[jax.Array, "PagedKVCache"]:
        """Writes k, v [B, T, K, D] at write_slot, attends q [B, T, N, D] over the row's
        blocks; -> (out [B, T, N, D], cache with layer's pages updated)."""
        fn = _per_shard(_prefill_attend, self.mesh, self.batch_axes, 8, 3)
        out, pk, pv = fn(self.k[layer], self.v[layer], q, k, v, self.block_table,
                         self.write_slot, self.kv_start)
        ks, vs = list(self.k), list(self.v)
        ks[layer], vs[layer] = pk, pv
        return out, self.replace(k=tuple(ks), v=tuple(vs))


def _chunk_attend(pages_k, pages_v, chunk_k, chunk_v, q, k, v, block_table, kv_start, ctx_len,
                  step):
    """Puts k, v [B, 1, K, D] at chunk column `step` ([B] copies of it), then attends the row's
    context slots [kv_start, ctx_len) and the chunk columns [0, step]."""
    step = step[0]
    zero = jnp.zeros((), jnp.int32)
    chunk_k = jax.lax.dynamic_update_slice(chunk_k, k.astype(chunk_k.dtype), (zero, step, zero,
                                                                              zero))
    chunk_v = jax.lax.dynamic_update_slice(chunk_v, v.astype(chunk_v.dtype), (zero, step, zero,
                                                                              zero))
    keys = jnp.concatenate([gather_blocks(pages_k, block_table), chunk_k], axis=1)
    values = jnp.concatenate([gather_blocks(pages_v, block_table), chunk_v], axis=1)
    s = jnp.arange(block_table.shape[1] * pages_k.shape[1], dtype=jnp.int32)[None, :]
    j = jnp.arange(chunk_k.shape[1], dtype=jnp.int32)[None, :]
    ctx_mask = (s >= kv_start[:, None]) & (s < ctx_len[:, None])
    mask = jnp.concatenate([ctx_mask, jnp.broadcast_to(j <= step, (q.shape[0], j.shape[1]))],
                           axis=1)
    return attention(q, keys, values, mask[:, None, None, :]), chunk_k, chunk_v


@flax.struct.dataclass
class ChunkKVCache:
    """The pool read-only plus a dense chunk buffer, for the decode steps of one chunk.

    k, v:           L-tuples of pages (as `PagedKVCache`), unchanged until `flush`.
    chunk_k/v:      L-tuples of [S, K_chunk, K, D]: column j holds the keys of the token fed
                    at the chunk's step j.
    block_table:    int32[S, C]: the blocks of the row's context (read, never written here);
    kv_start:       int32[S] as in `PagedKVCache`.
    ctx_len:        int32[S]: virtual slots filled before the chunk (its first token's slot).
    step:           int32[S] (every entry the chunk's current step).
    """
    k: tuple
    v: tuple
    chunk_k: tuple
    chunk_v: tuple
    block_table: jax.Array
    kv_start: jax.Array
    ctx_len: jax.Array
    step: jax.Array
    mesh: Optional[Mesh] = flax.struct.field(pytree_node=False, default=None)
    batch_axes: Sequence[str] = flax.struct.field(pytree_node=False, default=())

    def attend(self, layer: int, q: jax.Array, k: jax.Array,
               v: jax.Array) -> tuple[jax.Array, "ChunkKVCache"]:
        """q [S, 1, N, D] over the row's context and the chunk so far (k, v included)."""
        fn = _per_shard(_chunk_attend, self.mesh, self.batch_axes, 11, 3)
        out, ck, cv = fn(self.k[layer], self.v[layer], self.chunk_k[layer], self.chunk_v[layer],
                         q, k, v, self.block_table, self.kv_start, self.ctx_len, self.step)
        cks, cvs = list(self.chunk_k), list(self.chunk_v)
        cks[layer], cvs[layer] = ck, cv
        return out, self.replace(chunk_k=tuple(cks), chunk_v=tuple(cvs))

    def flush(self, flush_table: jax.Array, new_tokens: jax.Array) -> tuple[tuple, tuple]:
        """Writes each row's first new_tokens[S] chunk columns into its blocks at virtual slots
        ctx_len, ctx_len + 1, ...; flush_table int32[S, F]: the row's blocks through those
        slots (block_table is their first C) -> the updated (k, v) pages."""
        width = self.chunk_k[0].shape[1]
        j = jnp.arange(width, dtype=jnp.int32)[None, :]
        write_slot = jnp.where(j < new_tokens[:, None], self.ctx_len[:, None] + j, -1)
        fn = _per_shard(write_pages, self.mesh, self.batch_axes, 6, 2)
        ks, vs = [], []
        for layer in range(len(self.k)):
            pk, pv = fn(self.k[layer], self.v[layer], self.chunk_k[layer], self.chunk_v[layer],
                        flush_table, write_slot)
            ks.append(pk)
            vs.append(pv)
        return tuple(ks), tuple(vs)
