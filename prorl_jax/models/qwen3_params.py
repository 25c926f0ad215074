"""Hugging Face Qwen3 checkpoints <-> `Qwen3Config` and the model's parameter names.

config.json: model_type "qwen3", architectures ["Qwen3ForCausalLM"], head_dim stated (absent:
hidden_size / num_attention_heads, as transformers does), attention_bias false (the dense Qwen3
models have none). Tensor names mirror the module names (`hf_common.MIRRORED_NAME_RULES`): the
per-head norms are `model.layers.{i}.self_attn.{q,k}_norm.weight` [head_dim].
"""
from __future__ import annotations

from typing import Any, Mapping

from prorl_jax.models import hf_common
from prorl_jax.models.hf_common import CheckpointError
from prorl_jax.models.qwen3 import Qwen3Config

MODEL_TYPE = "qwen3"
ARCHITECTURE = "Qwen3ForCausalLM"
NAME_RULES = hf_common.MIRRORED_NAME_RULES


def config_from_hf(hf: Mapping[str, Any], source: str, **overrides) -> Qwen3Config:
    """Qwen3Config from a parsed config.json (`source` names it in errors); `overrides` set
    other fields (dtype, param_dtype, remat, attention_impl, ...)."""
    hf_common.check_decoder(hf, source, MODEL_TYPE, ARCHITECTURE)
    if hf.get("attention_bias", False):
        raise CheckpointError(f"{source}: attention_bias=true is not supported; expected the "
                              "dense Qwen3 layout (no q/k/v/o biases)")
    fields = hf_common.decoder_fields(hf, source)
    fields["head_dim"] = int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])
    return hf_common.make_config(Qwen3Config, fields, overrides, source)


def config_to_hf(config: Qwen3Config, dtype: Any = None) -> dict[str, Any]:
    """The config.json dict of `config` (`dtype`: the stored dtype, default param_dtype)."""
    return {**hf_common.decoder_to_hf(config, MODEL_TYPE, ARCHITECTURE, dtype),
            "head_dim": config.head_dim, "attention_bias": False}
