"""The model families by name: config class, model class and Hugging Face mapping module.

A new family (Llama, ...) is one model file (config dataclass with `family`, an Attention
subclass, a `DecoderLM` subclass, PRESETS) plus one mapping file (MODEL_TYPE, ARCHITECTURE,
NAME_RULES, config_from_hf, config_to_hf) and one line in `FAMILIES`. Nothing else imports a
family: the sampler, sharding rules, weight I/O and build code go through this registry and
`protocol`.
"""
from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

from flax import nnx

from prorl_jax.models import qwen2, qwen2_params, qwen3, qwen3_params
from prorl_jax.models.hf_common import CheckpointError


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: its config and model classes, its HF mapping module, its presets."""
    name: str
    config_cls: type
    model_cls: type
    hf: ModuleType
    presets: dict


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("qwen2", qwen2.Qwen2Config, qwen2.Qwen2ForCausalLM, qwen2_params, qwen2.PRESETS),
    Family("qwen3", qwen3.Qwen3Config, qwen3.Qwen3ForCausalLM, qwen3_params, qwen3.PRESETS),
)}


def _all_presets() -> dict[str, Any]:
    presets: dict[str, Any] = {}
    for family in FAMILIES.values():
        clash = sorted(set(presets) & set(family.presets))
        if clash:
            raise ValueError(f"preset name(s) {clash} defined by two families")
        presets.update(family.presets)
    return presets


PRESETS: dict[str, Any] = _all_presets()  # preset name -> config, every family


def family_of(config: Any) -> Family:
    """The family of a model config (by its `family` class attribute)."""
    name = getattr(config, "family", None)
    if name not in FAMILIES:
        raise TypeError(f"{type(config).__name__} is not a registered model config (family "
                        f"{name!r}; expected one of {sorted(FAMILIES)})")
    return FAMILIES[name]


def family_for_model_type(model_type: Any, source: str) -> Family:
    """The family whose checkpoints have this config.json `model_type`."""
    for family in FAMILIES.values():
        if family.hf.MODEL_TYPE == model_type:
            return family
    supported = sorted(f.hf.MODEL_TYPE for f in FAMILIES.values())
    raise CheckpointError(f"{source}: model_type={model_type!r} is not supported; expected one "
                          f"of {supported}")


def init_model(config: Any, seed: int = 0) -> nnx.Module:
    """A randomly initialised model of config's family (normal(0.02) weights, unit norms, zero
    biases)."""
    return family_of(config).model_cls(config, rngs=nnx.Rngs(seed))


def abstract_model(config: Any) -> nnx.Module:
    """The model with ShapeDtypeStruct leaves (allocates nothing)."""
    model_cls = family_of(config).model_cls
    return nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0)))
