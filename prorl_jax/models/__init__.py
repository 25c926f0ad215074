"""The policy network (Qwen2, Flax NNX) and its Hugging Face weight I/O."""
from prorl_jax.models.hf_io import (CheckpointError, config_from_hf, config_to_hf, hf_tensors,
                                    load_pretrained, read_config, save_pretrained)
from prorl_jax.models.qwen2 import (PRESETS, KVCache, Qwen2Config, Qwen2ForCausalLM,
                                    init_model)

__all__ = ["PRESETS", "KVCache", "Qwen2Config", "Qwen2ForCausalLM", "init_model",
           "CheckpointError", "config_from_hf", "config_to_hf", "hf_tensors", "load_pretrained",
           "read_config", "save_pretrained"]
