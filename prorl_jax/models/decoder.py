"""The decoder-only transformer every family shares, implementing `protocol.CausalLM`.

token embedding -> N x [RMSNorm -> grouped-query self-attention with rotary position embeddings
-> residual -> RMSNorm -> SwiGLU MLP -> residual] -> final RMSNorm -> LM head (tied to the
embedding or separate). A family file supplies its config dataclass (a `DecoderConfig`: shapes,
`qkv_bias`) and, where its attention differs, an `Attention` subclass (Qwen3: q/k norms in
`normalize_qk`); everything else is here. Parameter names mirror the Hugging Face checkpoints (see `protocol`).
Shapes: B batch, T time, S key time, N query heads, K kv heads, D head dim, H hidden, V vocab.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from prorl_jax.models.kv_cache import DenseKVCache
from prorl_jax.models.layers import (MLP, RMSNorm, attention, attention_mask, linear,
                                     rotary_embedding)

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Shapes and numerics shared by the decoder families (Hugging Face config.json names).

    dtype:          compute dtype of activations and matmuls ("float32" or "bfloat16").
    param_dtype:    storage dtype of the parameters (fp32 master weights under bf16 compute work).
    remat:          gradient checkpointing per decoder layer: "none", "full" (recompute all),
                    "dots" (save matmul outputs), "dots_no_batch" (save weight matmuls only).
    attention_impl: "auto" (cuDNN flash attention on GPU when it applies, else XLA), "xla", "cudnn".
    A family sets the class attributes `family` (registry name), `qkv_bias` and `qk_norm`.
    """
    family: ClassVar[str] = ""
    qkv_bias: ClassVar[bool] = False
    qk_norm: ClassVar[bool] = False

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention_impl: str = "auto"

    def __post_init__(self):
        name = type(self).__name__
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{name}.num_attention_heads={self.num_attention_heads} must be "
                             f"a multiple of num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"{name}.head_dim={self.head_dim} must be even (rotary halves)")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"{name}.remat={self.remat!r}: expected one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"{name}.attention_impl={self.attention_impl!r}: expected one "
                             f"of {ATTENTION_IMPLS}")
        for field in ("dtype", "param_dtype"):
            jnp.dtype(getattr(self, field))  # raises TypeError on an unknown dtype name

    @property
    def head_dim(self) -> int:
        raise NotImplementedError

    def replace(self, **changes) -> "DecoderConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Total parameter count (the embedding counted once when tied)."""
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = 2 * h * q + 2 * h * kv
        attn += (q + 2 * kv) * self.qkv_bias + 2 * d * self.qk_norm
        layer = attn + 3 * h * f + 2 * h
        head = 0 if self.tie_word_embeddings else h * self.vocab_size
        return self.vocab_size * h + self.num_hidden_layers * layer + h + head


class Attention(nnx.Module):
    """Grouped-query self-attention: N query heads share K kv heads; q/k/v projections with
    biases iff cfg.qkv_bias, o_proj without. A family may override `normalize_qk`."""

    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
        n, k = cfg.num_attention_heads, cfg.num_key_value_heads
        d, h = cfg.head_dim, cfg.hidden_size
        dt, pdt, bias = cfg.dtype, cfg.param_dtype, cfg.qkv_bias
        self.q_proj = linear(h, n * d, bias, dt, pdt, rngs)
        self.k_proj = linear(h, k * d, bias, dt, pdt, rngs)
        self.v_proj = linear(h, k * d, bias, dt, pdt, rngs)
        self.o_proj = linear(n * d, h, False, dt, pdt, rngs)
        self.cfg = cfg

    def normalize_qk(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        """q [B, T, N, D], k [B, T, K, D] before the rotary embedding (default: unchanged)."""
        return q, k

    def project(self, x: jax.Array, positions: jax.Array):
        """x [B, T, H], positions int[B, T] -> rotated q [B, T, N, D], k [B, T, K, D], v."""
        b, t, _ = x.shape
        c = self.cfg
        q = self.q_proj(x).reshape(b, t, c.num_attention_heads, c.head_dim)
        k = self.k_proj(x).reshape(b, t, c.num_key_value_heads, c.head_dim)
        v = self.v_proj(x).reshape(b, t, c.num_key_value_heads, c.head_dim)
        q, k = self.normalize_qk(q, k)
        return (rotary_embedding(q, positions, c.rope_theta),
                rotary_embedding(k, positions, c.rope_theta), v)

    def output(self, out: jax.Array) -> jax.Array:
        """Attention output [B, T, N, D] -> o_proj -> [B, T, H]."""
        b, t = out.shape[:2]
        return self.o_proj(out.reshape(b, t, -1))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: DecoderConfig, attention_cls: type, rngs: nnx.Rngs):
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt, pdt)
        self.self_attn = attention_cls(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt, pdt)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dt, pdt, rngs)
        self.attention_impl = cfg.attention_impl

    def __call__(self, x, positions, mask, is_causal):
        """Full-sequence layer: x [B, T, H] -> [B, T, H] (mask bool[B, 1, T, T] or None)."""
        q, k, v = self.self_attn.project(self.input_layernorm(x), positions)
        out = attention(q, k, v, mask, is_causal, self.attention_impl)
        x = x + self.self_attn.output(out)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode(self, x, positions, cache, index: int):
        """The layer over T new tokens, keys and values kept by `cache` (a protocol.KVCache)."""
        q, k, v = self.self_attn.project(self.input_layernorm(x), positions)
        out, cache = cache.attend(index, q, k, v)
        x = x + self.self_attn.output(out)
        return x + self.mlp(self.post_attention_layernorm(x)), cache


def _remat_policy(name: str):
    cp = jax.checkpoint_policies
    return {"full": cp.nothing_saveable, "dots": cp.dots_saveable,
            "dots_no_batch": cp.dots_with_no_batch_dims_saveable}[name]


def _remat_layer(layer: DecoderLayer, x, positions, mask, policy: str):
    """The layer under jax.checkpoint, as a pure function of its split state (so it works
    whatever trace level the parameters come from: jit, scan, map, grad)."""
    graphdef, state = nnx.split(layer)

    def pure(state, x, positions, mask):
        return nnx.merge(graphdef, state)(x, positions, mask, mask is None)

    return jax.checkpoint(pure, policy=_remat_policy(policy))(state, x, positions, mask)


class DecoderLM(nnx.Module):
    """A causal LM (protocol.CausalLM). `model(input_ids)` -> logits f32[B, T, V].
    A family subclass sets `attention_cls` (its Attention subclass)."""
    attention_cls: ClassVar[type] = Attention

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        cfg = self.config = config
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt,
                                      param_dtype=pdt,
                                      embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, self.attention_cls, rngs)
                                for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt, pdt)
        if not cfg.tie_word_embeddings:
            self.lm_head = linear(cfg.hidden_size, cfg.vocab_size, False, dt, pdt, rngs)

    def hidden_states(self, input_ids: jax.Array, positions: Optional[jax.Array] = None,
                      segment_ids: Optional[jax.Array] = None) -> jax.Array:
        """Final-normed hidden states [B, T, H].

        input_ids int[B, T]; positions int[B, T] (default 0..T-1; give them for left-padded or
        packed rows); segment_ids int[B, T] (>0: which sequence a slot belongs to, 0: padding;
        None: one causal sequence per row, padding only at the end).
        """
        b, t = input_ids.shape
        index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        positions = index if positions is None else positions
        mask = None
        if segment_ids is not None:
            mask = attention_mask(segment_ids, segment_ids, index, index)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            if self.config.remat == "none":
                x = layer(x, positions, mask, mask is None)
            else:
                x = _remat_layer(layer, x, positions, mask, self.config.remat)
        return self.norm(x)

    def head_kernel(self) -> jax.Array:
        """The LM head as a [H, V] matrix in the compute dtype (logits = hidden @ kernel)."""
        if self.config.tie_word_embeddings:
            w = self.embed_tokens.embedding[...].T
        else:
            w = self.lm_head.kernel[...]
        return w.astype(jnp.dtype(self.config.dtype))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [B, T, H] -> logits [B, T, V], accumulated in float32."""
        return jnp.einsum("bth,hv->btv", hidden, self.head_kernel(),
                          preferred_element_type=jnp.float32)

    def __call__(self, input_ids: jax.Array, positions: Optional[jax.Array] = None,
                 segment_ids: Optional[jax.Array] = None) -> jax.Array:
        """Logits float32[B, T, V]; see `hidden_states` for the arguments."""
        return self.logits(self.hidden_states(input_ids, positions, segment_ids))

    # -- decoding with a key/value cache (used by the embedded sampler) -------------------------

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> DenseKVCache:
        """A zeroed `DenseKVCache` of L layers x [batch, max_len, K, D] (default: compute dtype)."""
        c = self.config
        return DenseKVCache.zeros(c.num_hidden_layers, batch, max_len, c.num_key_value_heads,
                                  c.head_dim, jnp.dtype(c.dtype) if dtype is None else dtype)

    def decode(self, input_ids: jax.Array, positions: jax.Array, cache):
        """Runs T new tokens per row (input_ids, positions int[B, T]) against `cache` (any
        protocol.KVCache: it decides where each row's keys go and which it attends);
        -> (hidden [B, T, H] final-normed, updated cache)."""
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            x, cache = layer.decode(x, positions, cache, i)
        return self.norm(x), cache
