"""Qwen3 (dense) as a Flax NNX module.

The shared decoder (`decoder.py`) with Qwen3's attention: q/k/v projections without biases, an
explicit head_dim (num_attention_heads * head_dim may differ from hidden_size: 16 x 128 = 2048
for a 1024-wide Qwen3-0.6B), and RMSNorm over each head's D features of q and of k (weights [D]
shared by the heads, eps = rms_norm_eps) before the rotary embedding:
    q = rope(q_norm(x W_q reshaped [B, T, N, D])),  k = rope(k_norm(x W_k reshaped [B, T, K, D])).
Hugging Face names: `qwen3_params.py`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from prorl_jax.models.decoder import Attention, DecoderConfig, DecoderLM
from prorl_jax.models.layers import RMSNorm


@dataclasses.dataclass(frozen=True)
class Qwen3Config(DecoderConfig):
    """A Qwen3 model's shapes and numerics; see `DecoderConfig` for the shared fields.

    head_dim: features per attention head (Qwen3's config.json states it; 128 in every
              published dense Qwen3).
    """
    family = "qwen3"
    qk_norm = True

    head_dim: int = 128


class Qwen3Attention(Attention):
    """The shared attention (no biases: qkv_bias is False) with per-head RMSNorm on q and k."""

    def __init__(self, cfg: Qwen3Config, rngs: nnx.Rngs):
        super().__init__(cfg, rngs)
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dt, pdt)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dt, pdt)

    def normalize_qk(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        """q [B, T, N, D] -> q_norm(q), k [B, T, K, D] -> k_norm(k), over each head's D."""
        return self.q_norm(q), self.k_norm(k)


class Qwen3ForCausalLM(DecoderLM):
    """The Qwen3 causal LM (protocol.CausalLM)."""
    attention_cls = Qwen3Attention


PRESETS: dict[str, Qwen3Config] = {
    # Qwen/Qwen3-0.6B (config.json: 28 layers, 1024 wide, 16 heads x 128, 8 kv heads, tied)
    "qwen3-0.6b": Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True),
    # Qwen/Qwen3-1.7B
    "qwen3-1.7b": Qwen3Config(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True),
    # Tests and the CPU demo (`--config.model.preset=tiny-qwen3`): heads x head_dim = 2 x hidden.
    "tiny-qwen3": Qwen3Config(
        vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True),
}
