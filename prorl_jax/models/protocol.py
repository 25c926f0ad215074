"""The small causal-LM protocol every model family implements, and the KV-cache protocol.

Everything outside a family's own files (the sampler, the trainer's log-probs, the sharding rules,
the weight I/O, the build code) talks to a model only through these names:

    model.config                 a frozen dataclass (see `ModelConfig`)
    model(input_ids, positions=None, segment_ids=None)   -> logits f32[B, T, V]
    model.hidden_states(input_ids, positions=None, segment_ids=None) -> [B, T, H] (final-normed)
    model.head_kernel()          -> [H, V] in the compute dtype (logits = hidden @ kernel)
    model.logits(hidden)         -> f32[B, T, V]
    model.init_cache(batch, max_len, dtype=None) -> a zeroed `DenseKVCache`
    model.decode(input_ids, positions, cache) -> (hidden [B, T, H], cache)

`decode` runs T new tokens per row through the layers; per layer the model computes the rotated
q [B, T, N, D] and k, v [B, T, K, D] and hands them to `cache.attend(layer, q, k, v)`, which
stores k, v where the cache's own bookkeeping says (per row) and returns the attention output
[B, T, N, D] over that row's cached keys, the new ones included. So a cache layout (dense rows,
paged blocks with a block table) is family-agnostic and lives outside the model files.

Parameter naming (what `prorl_jax/sharding.py`'s rules and a family's Hugging Face mapping see):
`embed_tokens.embedding`, `layers.{i}.input_layernorm.weight`,
`layers.{i}.self_attn.{q,k,v,o}_proj.{kernel,bias}`, `layers.{i}.self_attn.{q,k}_norm.weight`,
`layers.{i}.post_attention_layernorm.weight`, `layers.{i}.mlp.{gate,up,down}_proj.kernel`,
`norm.weight`, `lm_head.kernel` (absent when tied).
"""
from __future__ import annotations

from typing import Any, Optional, Protocol, runtime_checkable

import jax


@runtime_checkable
class ModelConfig(Protocol):
    """The fields generic code reads from `model.config` (each family's dataclass has them).

    family:       registry name of the family ("qwen2", "qwen3"), a class attribute.
    vocab_size, hidden_size, num_hidden_layers, num_key_value_heads, head_dim,
    max_position_embeddings, tie_word_embeddings: shapes (Hugging Face names).
    dtype, param_dtype, remat, attention_impl: numerics and memory settings.
    """
    family: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_key_value_heads: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    dtype: str
    param_dtype: str
    remat: str
    attention_impl: str

    @property
    def head_dim(self) -> int: ...

    def replace(self, **changes) -> "ModelConfig": ...

    def num_params(self) -> int: ...


@runtime_checkable
class KVCache(Protocol):
    """A key/value cache a model's `decode` writes into and attends over, one layer at a time."""

    def attend(self, layer: int, q: jax.Array, k: jax.Array,
               v: jax.Array) -> tuple[jax.Array, "KVCache"]:
        """Stores k, v [B, T, K, D] of T new tokens for `layer`, then attends the rotated
        q [B, T, N, D] over the row's cached keys (the new ones included, causally);
        -> (out [B, T, N, D], the cache with that layer's buffers updated)."""


@runtime_checkable
class CausalLM(Protocol):
    """A decoder-only language model (Flax NNX module); see the module docstring."""
    config: Any

    def __call__(self, input_ids: jax.Array, positions: Optional[jax.Array] = None,
                 segment_ids: Optional[jax.Array] = None) -> jax.Array: ...

    def hidden_states(self, input_ids: jax.Array, positions: Optional[jax.Array] = None,
                      segment_ids: Optional[jax.Array] = None) -> jax.Array: ...

    def head_kernel(self) -> jax.Array: ...

    def logits(self, hidden: jax.Array) -> jax.Array: ...

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache: ...

    def decode(self, input_ids: jax.Array, positions: jax.Array,
               cache: KVCache) -> tuple[jax.Array, KVCache]: ...
