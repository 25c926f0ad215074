"""The policy networks (Flax NNX decoder families behind one causal-LM protocol) and their
Hugging Face weight I/O. Families: `registry.FAMILIES` (qwen2, qwen3)."""
from prorl_jax.models.hf_common import CheckpointError
from prorl_jax.models.hf_io import (config_from_hf, config_to_hf, hf_tensors, load_pretrained,
                                    read_config, save_pretrained)
from prorl_jax.models.kv_cache import DenseKVCache
from prorl_jax.models.protocol import CausalLM, KVCache, ModelConfig
from prorl_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from prorl_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from prorl_jax.models.registry import FAMILIES, PRESETS, family_of, init_model

__all__ = ["CausalLM", "CheckpointError", "DenseKVCache", "FAMILIES", "KVCache", "ModelConfig",
           "PRESETS", "Qwen2Config", "Qwen2ForCausalLM", "Qwen3Config", "Qwen3ForCausalLM",
           "config_from_hf", "config_to_hf", "family_of", "hf_tensors", "init_model",
           "load_pretrained", "read_config", "save_pretrained"]
