"""The policy network (Qwen2, Flax NNX) and its Hugging Face weight I/O."""
from prorl_jax.models.qwen2 import (PRESETS, KVCache, Qwen2Config, Qwen2ForCausalLM,
                                    init_model)

__all__ = ["PRESETS", "KVCache", "Qwen2Config", "Qwen2ForCausalLM", "init_model"]
