"""Building blocks shared by the decoder families: RMSNorm, rotary embeddings, masks, attention,
the SwiGLU MLP and a linear layer.

Shapes: B batch, T time (query), S key time, N query heads, K kv heads, D head dim, H hidden,
F MLP width.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx


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


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array] = None,
              is_causal: bool = False, impl: str = "xla") -> jax.Array:
    """softmax(q k^T / sqrt(D) + mask) v with grouped-query heads -> [B, T, N, D].

    q [B, T, N, D]; k, v [B, S, K, D] (N a multiple of K); mask bool[B, 1, T, S] or None;
    impl "auto" (cuDNN flash attention on GPU when there is no mask, else XLA), "xla", "cudnn".
    A query whose keys are all masked gets the mean of v (finite, never read by callers).
    """
    if impl == "auto":
        impl = "xla" if (mask is not None or jax.default_backend() != "gpu") else None
    return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask,
                                        is_causal=is_causal, implementation=impl)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last axis, normalised in float32."""

    def __init__(self, dim: int, eps: float, dtype, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * y.astype(self.dtype)


def linear(n_in: int, n_out: int, bias: bool, dtype, param_dtype,
           rngs: nnx.Rngs) -> nnx.Linear:
    """y = x @ kernel [+ bias]; kernel [n_in, n_out] initialised normal(0.02), bias zero."""
    return nnx.Linear(n_in, n_out, use_bias=bias, dtype=jnp.dtype(dtype),
                      param_dtype=jnp.dtype(param_dtype),
                      kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); [.., H] -> [.., F] -> [.., H], no biases."""

    def __init__(self, hidden: int, width: int, dtype, param_dtype, rngs: nnx.Rngs):
        self.gate_proj = linear(hidden, width, False, dtype, param_dtype, rngs)
        self.up_proj = linear(hidden, width, False, dtype, param_dtype, rngs)
        self.down_proj = linear(width, hidden, False, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
