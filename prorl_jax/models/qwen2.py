"""Qwen2 decoder-only language model as a Flax NNX module.

Architecture (Qwen2 / DeepSeek-R1-Distill-Qwen): token embedding -> N x [RMSNorm -> grouped-query
self-attention with q/k/v biases and rotary position embeddings -> residual -> RMSNorm -> SwiGLU
MLP -> residual] -> final RMSNorm -> LM head (tied to the embedding or separate).

Parameter names mirror the Hugging Face checkpoint (`layers[i].self_attn.q_proj.kernel` is
`model.layers.i.self_attn.q_proj.weight` transposed) so weight I/O and sharding rules map by name.
Shapes: B batch, T time (query), S key time, N query heads, K kv heads, D head dim, H hidden,
F MLP width, V vocabulary.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Shapes and numerics of a Qwen2 model (field names follow Hugging Face's config.json).

    dtype:          compute dtype of activations and matmuls ("float32" or "bfloat16").
    param_dtype:    storage dtype of the parameters (fp32 master weights under bf16 compute work).
    remat:          gradient checkpointing per decoder layer: "none", "full" (recompute all),
                    "dots" (save matmul outputs), "dots_no_batch" (save weight matmuls only).
    attention_impl: "auto" (cuDNN flash attention on GPU when it applies, else XLA), "xla", "cudnn".
    """
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
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"Qwen2Config.hidden_size={self.hidden_size} must be divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"Qwen2Config.num_attention_heads={self.num_attention_heads} must be "
                             f"a multiple of num_key_value_heads={self.num_key_value_heads}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"Qwen2Config.remat={self.remat!r}: expected one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"Qwen2Config.attention_impl={self.attention_impl!r}: expected one "
                             f"of {ATTENTION_IMPLS}")
        for name in ("dtype", "param_dtype"):
            jnp.dtype(getattr(self, name))  # raises TypeError on an unknown dtype name

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes) -> "Qwen2Config":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Total parameter count (the embedding counted once when tied)."""
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * q + q + 2 * (h * kv + kv) + q * h
        layer = attn + 3 * h * f + 2 * h
        head = 0 if self.tie_word_embeddings else h * self.vocab_size
        return self.vocab_size * h + self.num_hidden_layers * layer + h + head


PRESETS: dict[str, Qwen2Config] = {
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
    "r1-distill-qwen-1.5b": Qwen2Config(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False),
    # Qwen/Qwen2.5-1.5B
    "qwen2.5-1.5b": Qwen2Config(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    # Tests and the CPU demo.
    "tiny": Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
}


class KVCache(NamedTuple):
    """Key/value cache for decoding: k, v are L-tuples (one per layer) of [B, S_max, K, D]
    (separate buffers, so a decode step updates each layer's cache in place)."""
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Applies rotary position embeddings (rotate-half layout) to x [B, T, heads, D].

    inv_freq_i = theta^(-2i/D); angle = position * inv_freq; x' = x*cos + rotate_half(x)*sin,
    with rotate_half([x1, x2]) = [-x2, x1]; angles computed in float32.
    """
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def attention_mask(q_segments: jax.Array, kv_segments: jax.Array, q_index: jax.Array,
                   kv_index: jax.Array) -> jax.Array:
    """bool[B, 1, T, S]: query t sees key s iff same non-zero segment and kv_index <= q_index.

    Segment id 0 marks padding. q_index [B, T] and kv_index [B, S] are slot indices in the row
    (causality is by slot order, so packed and left-padded rows are both causal).
    """
    same = (q_segments[:, :, None] == kv_segments[:, None, :]) & (kv_segments[:, None, :] > 0)
    causal = kv_index[:, None, :] <= q_index[:, :, None]
    return (same & causal)[:, None]


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, normalised in float32."""

    def __init__(self, dim: int, eps: float, dtype, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * y.astype(self.dtype)


def _linear(cfg: Qwen2Config, n_in: int, n_out: int, bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=bias, dtype=jnp.dtype(cfg.dtype),
                      param_dtype=jnp.dtype(cfg.param_dtype),
                      kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


class Attention(nnx.Module):
    """Grouped-query attention: N query heads share K kv heads; q/k/v have biases, o has none."""

    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        d, n, k = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.q_proj = _linear(cfg, cfg.hidden_size, n * d, True, rngs)
        self.k_proj = _linear(cfg, cfg.hidden_size, k * d, True, rngs)
        self.v_proj = _linear(cfg, cfg.hidden_size, k * d, True, rngs)
        self.o_proj = _linear(cfg, n * d, cfg.hidden_size, False, rngs)
        self.cfg = cfg

    def project(self, x: jax.Array, positions: jax.Array):
        """x [B, T, H] -> rotated q [B, T, N, D], k [B, T, K, D], v [B, T, K, D]."""
        b, t, _ = x.shape
        c = self.cfg
        q = self.q_proj(x).reshape(b, t, c.num_attention_heads, c.head_dim)
        k = self.k_proj(x).reshape(b, t, c.num_key_value_heads, c.head_dim)
        v = self.v_proj(x).reshape(b, t, c.num_key_value_heads, c.head_dim)
        return (rotary_embedding(q, positions, c.rope_theta),
                rotary_embedding(k, positions, c.rope_theta), v)

    def attend(self, q, k, v, mask: Optional[jax.Array], is_causal: bool) -> jax.Array:
        """softmax(q k^T / sqrt(D) + mask) v, then o_proj: -> [B, T, H]."""
        b, t = q.shape[:2]
        impl = self.cfg.attention_impl
        impl = None if impl == "auto" else impl
        if impl is None and (mask is not None or jax.default_backend() != "gpu"):
            impl = "xla"
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                           implementation=impl)
        return self.o_proj(out.reshape(b, t, -1))


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        self.gate_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, False, rngs)
        self.up_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, False, rngs)
        self.down_proj = _linear(cfg, cfg.intermediate_size, cfg.hidden_size, False, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt, pdt)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt, pdt)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, mask, is_causal):
        """Full-sequence layer: x [B, T, H] -> [B, T, H]."""
        q, k, v = self.self_attn.project(self.input_layernorm(x), positions)
        x = x + self.self_attn.attend(q, k, v, mask, is_causal)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode(self, x, positions, cache_k, cache_v, cache_index, mask):
        """Layer over T new tokens written into the cache at slots [cache_index, cache_index+T).

        cache_k/v [B, S_max, K, D]; mask bool[B, 1, T, S_max]. Returns (x, cache_k, cache_v).
        """
        q, k, v = self.self_attn.project(self.input_layernorm(x), positions)
        zero = jnp.zeros((), jnp.int32)
        cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype),
                                               (zero, cache_index, zero, zero))
        cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype),
                                               (zero, cache_index, zero, zero))
        x = x + self.self_attn.attend(q, cache_k.astype(q.dtype), cache_v.astype(q.dtype),
                                      mask, False)
        return x + self.mlp(self.post_attention_layernorm(x)), cache_k, cache_v


def _remat_policy(name: str):
    cp = jax.checkpoint_policies
    return {"full": cp.nothing_saveable, "dots": cp.dots_saveable,
            "dots_no_batch": cp.dots_with_no_batch_dims_saveable}[name]


class Qwen2ForCausalLM(nnx.Module):
    """The Qwen2 causal LM. `model(input_ids)` -> logits [B, T, V] (compute dtype)."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        cfg = config
        self.config = cfg
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size,
                                      dtype=jnp.dtype(cfg.dtype),
                                      param_dtype=jnp.dtype(cfg.param_dtype),
                                      embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, jnp.dtype(cfg.dtype),
                            jnp.dtype(cfg.param_dtype))
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg, cfg.hidden_size, cfg.vocab_size, False, rngs)

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

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache:
        """Zeroed cache, L layers of [batch, max_len, K, D] in `dtype` (default: compute)."""
        c = self.config
        shape = (batch, max_len, c.num_key_value_heads, c.head_dim)
        dtype = jnp.dtype(c.dtype) if dtype is None else dtype
        layers = range(c.num_hidden_layers)
        return KVCache(tuple(jnp.zeros(shape, dtype) for _ in layers),
                       tuple(jnp.zeros(shape, dtype) for _ in layers))

    def decode(self, input_ids: jax.Array, positions: jax.Array, cache: KVCache,
               cache_index: jax.Array, kv_valid: jax.Array):
        """Runs T new tokens per row against the cache; returns (hidden [B, T, H], new cache).

        The tokens are written at cache slots [cache_index, cache_index + T) (same for all rows).
        kv_valid bool[B, S_max] marks the slots that hold real tokens (the new ones included);
        query t attends slot s iff kv_valid[b, s] and s <= cache_index + t.
        """
        b, t = input_ids.shape
        s_max = cache.k[0].shape[1]
        q_index = cache_index + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        kv_index = jnp.broadcast_to(jnp.arange(s_max, dtype=jnp.int32), (b, s_max))
        mask = (kv_valid[:, None, :] & (kv_index[:, None, :] <= q_index[:, :, None]))[:, None]
        x = self.embed_tokens(input_ids)
        ks, vs = [], []
        for layer, k, v in zip(self.layers, cache.k, cache.v):
            x, k, v = layer.decode(x, positions, k, v, cache_index, mask)
            ks.append(k)
            vs.append(v)
        return self.norm(x), KVCache(tuple(ks), tuple(vs))


def _remat_layer(layer: DecoderLayer, x, positions, mask, policy: str):
    """The layer under jax.checkpoint, as a pure function of its split state (so it works
    whatever trace level the parameters come from: jit, scan, map, grad)."""
    graphdef, state = nnx.split(layer)

    def pure(state, x, positions, mask):
        return nnx.merge(graphdef, state)(x, positions, mask, mask is None)

    return jax.checkpoint(pure, policy=_remat_policy(policy))(state, x, positions, mask)


def init_model(config: Qwen2Config, seed: int = 0) -> Qwen2ForCausalLM:
    """A randomly initialised model (normal(0.02) weights, unit norms, zero biases)."""
    return Qwen2ForCausalLM(config, rngs=nnx.Rngs(seed))
