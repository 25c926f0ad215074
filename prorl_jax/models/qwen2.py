"""Qwen2 (DeepSeek-R1-Distill-Qwen, Qwen2.5) as a Flax NNX module.

The shared decoder (`decoder.py`) as it is, with q/k/v biases (`qkv_bias`), no q/k norms and
head_dim = hidden_size / num_attention_heads. Hugging Face names: `qwen2_params.py`.
"""
from __future__ import annotations

import dataclasses

from prorl_jax.models.decoder import DecoderConfig, DecoderLM


@dataclasses.dataclass(frozen=True)
class Qwen2Config(DecoderConfig):
    """A Qwen2 model's shapes and numerics; see `DecoderConfig` for the fields."""
    family = "qwen2"
    qkv_bias = True

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"Qwen2Config.hidden_size={self.hidden_size} must be divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        super().__post_init__()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class Qwen2ForCausalLM(DecoderLM):
    """The Qwen2 causal LM (protocol.CausalLM): the shared decoder's attention as it is."""


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
