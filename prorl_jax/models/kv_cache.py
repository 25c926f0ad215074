"""The dense key/value cache: one preallocated [B, S_max] buffer per layer, per-row write index.

This is what `model.init_cache` returns (the static sampler path and the model's tests use it);
the paged cache of the continuous-batching sampler lives in `prorl_jax/rollout/paged_kv.py`.
Both implement `protocol.KVCache`.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from prorl_jax.models.layers import attention


@flax.struct.dataclass
class DenseKVCache:
    """k, v: L-tuples (one buffer per layer, so a decode step updates each in place) of
    [B, S_max, K, D]; index int32[B]: the slot of each row's first new token in the next
    `decode` call (set by the caller), or an int32 scalar when every row writes at the same
    slot (one in-place slice update instead of a per-row scatter); valid bool[B, S_max]: the
    slots that hold real tokens, the new ones included (padding slots False). Query t of row b
    attends slot s iff valid[b, s] and s <= index[b] + t."""
    k: tuple
    v: tuple
    index: jax.Array
    valid: jax.Array

    @classmethod
    def zeros(cls, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
              dtype: Any) -> "DenseKVCache":
        """Zeroed buffers, index 0 (every row) and no valid slot."""
        shape = (batch, max_len, kv_heads, head_dim)
        return cls(tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
                   tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
                   jnp.zeros((), jnp.int32), jnp.zeros((batch, max_len), bool))

    def attend(self, layer: int, q: jax.Array, k: jax.Array,
               v: jax.Array) -> tuple[jax.Array, "DenseKVCache"]:
        """Writes k, v [B, T, K, D] at slots [index, index + T) of each row, attends q
        [B, T, N, D] over the masked cache; -> (out [B, T, N, D], updated cache)."""
        b, t, s_max = q.shape[0], q.shape[1], self.k[layer].shape[1]

        def write(buf, new, start):  # [.., S_max, K, D] <- [.., T, K, D] at slot `start`
            zero = jnp.zeros((), jnp.int32)
            return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype),
                                                (zero,) * (buf.ndim - 3) + (start, zero, zero))

        if self.index.ndim == 0:
            keys, values = write(self.k[layer], k, self.index), write(self.v[layer], v, self.index)
        else:
            keys = jax.vmap(write)(self.k[layer], k, self.index)
            values = jax.vmap(write)(self.v[layer], v, self.index)
        index = jnp.broadcast_to(self.index, (b,))
        q_slot = index[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
        kv_slot = jnp.arange(s_max, dtype=jnp.int32)
        mask = self.valid[:, None, :] & (kv_slot[None, None, :] <= q_slot[:, :, None])
        out = attention(q, keys, values, mask[:, None])
        ks, vs = list(self.k), list(self.v)
        ks[layer], vs[layer] = keys, values
        return out, self.replace(k=tuple(ks), v=tuple(vs))
