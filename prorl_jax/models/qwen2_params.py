"""Hugging Face Qwen2 checkpoints <-> `Qwen2Config` and the model's parameter names.

config.json: model_type "qwen2", architectures ["Qwen2ForCausalLM"]; head_dim, when stated,
must be hidden_size / num_attention_heads. Tensor names mirror the module names
(`hf_common.MIRRORED_NAME_RULES`): q/k/v biases are `model.layers.{i}.self_attn.{q,k,v}_proj.bias`.
"""
from __future__ import annotations

from typing import Any, Mapping

from prorl_jax.models import hf_common
from prorl_jax.models.hf_common import CheckpointError
from prorl_jax.models.qwen2 import Qwen2Config

MODEL_TYPE = "qwen2"
ARCHITECTURE = "Qwen2ForCausalLM"
NAME_RULES = hf_common.MIRRORED_NAME_RULES


def config_from_hf(hf: Mapping[str, Any], source: str, **overrides) -> Qwen2Config:
    """Qwen2Config from a parsed config.json (`source` names it in errors); `overrides` set
    other fields (dtype, param_dtype, remat, attention_impl, ...)."""
    hf_common.check_decoder(hf, source, MODEL_TYPE, ARCHITECTURE)
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        raise CheckpointError(f"{source}: head_dim={head_dim} must equal hidden_size / "
                              f"num_attention_heads = {hf['hidden_size']}/"
                              f"{hf['num_attention_heads']}")
    return hf_common.make_config(Qwen2Config, hf_common.decoder_fields(hf, source), overrides,
                                 source)


def config_to_hf(config: Qwen2Config, dtype: Any = None) -> dict[str, Any]:
    """The config.json dict of `config` (`dtype`: the stored dtype, default param_dtype)."""
    return hf_common.decoder_to_hf(config, MODEL_TYPE, ARCHITECTURE, dtype)
