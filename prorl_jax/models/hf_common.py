"""What the families' Hugging Face mapping files share: the error type, config.json helpers and
the name rules of checkpoints whose module names mirror the model's (Qwen2, Qwen3, Llama, ...).

Name rules: (regex on the dotted nnx parameter path, HF name template for `re.sub`, transpose?),
first match wins. Mirrored: ('layers', 3, 'self_attn', 'q_proj', 'kernel') is
`model.layers.3.self_attn.q_proj.weight`; a `kernel` [in, out] is the HF `weight` [out, in]
transposed; `embed_tokens.embedding` [V, H] is `model.embed_tokens.weight` [V, H]; the untied
head `lm_head.kernel` [H, V] is `lm_head.weight` [V, H] (no `model.` prefix).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax.numpy as jnp

NameRules = Sequence[tuple[str, str, bool]]

MIRRORED_NAME_RULES: NameRules = (
    (r"^lm_head\.kernel$", "lm_head.weight", True),
    (r"^embed_tokens\.embedding$", "model.embed_tokens.weight", False),
    (r"^(.+)\.kernel$", r"model.\1.weight", True),
    (r"^(.+)\.(weight|bias)$", r"model.\1.\2", False),
)
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads")


class CheckpointError(ValueError):
    """A checkpoint directory, config or tensor that is not what the model needs."""


def apply_name_rules(path: Sequence[Any], rules: NameRules) -> tuple[str, bool]:
    """(HF tensor name, transpose?) of an nnx parameter path under `rules`."""
    dotted = ".".join(str(p) for p in path)
    for pattern, template, transpose in rules:
        if re.search(pattern, dotted):
            return re.sub(pattern, template, dotted), transpose
    raise KeyError(f"no Hugging Face name rule matches parameter {dotted!r}")


def rope_theta(hf: Mapping[str, Any], source: str) -> float:
    """rope_theta from the top level (transformers 4) or `rope_parameters` (transformers 5)."""
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for name, spec in (("rope_parameters", rope), ("rope_scaling", scaling)):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind != "default":
            raise CheckpointError(f"{source}: {name} rope_type={kind!r} is not supported; "
                                  "expected plain rotary embeddings ('default')")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def check_decoder(hf: Mapping[str, Any], source: str, model_type: str,
                  architecture: str) -> None:
    """Raises CheckpointError unless `hf` is a full-attention SiLU decoder of this type."""
    archs = hf.get("architectures") or []
    if hf.get("model_type") != model_type or any(a != architecture for a in archs):
        raise CheckpointError(f"{source}: expected model_type {model_type!r}, architectures "
                              f"[{architecture!r}], got model_type={hf.get('model_type')!r}, "
                              f"architectures={archs!r}")
    missing = [f for f in REQUIRED_FIELDS if f not in hf]
    if missing:
        raise CheckpointError(f"{source}: missing required field(s) {missing}")
    sliding = hf.get("use_sliding_window", False) or "sliding_attention" in (
        hf.get("layer_types") or [])
    if sliding:
        raise CheckpointError(f"{source}: use_sliding_window=true / sliding_attention layers are "
                              "not supported; expected full attention in every layer")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act={hf['hidden_act']!r}, expected 'silu'")


def decoder_fields(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The `DecoderConfig` fields of a parsed config.json (defaults as transformers')."""
    return dict(
        vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_hidden_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=int(hf["num_attention_heads"]),
        num_key_value_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        rope_theta=rope_theta(hf, source), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))


def make_config(config_cls: type, fields: Mapping[str, Any], overrides: Mapping[str, Any],
                source: str):
    """config_cls(**fields, **overrides); unknown overrides are a TypeError, invalid shapes a
    CheckpointError naming `source`."""
    known = config_cls.__dataclass_fields__
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise TypeError(f"unknown {config_cls.__name__} field(s) {unknown}; expected some of "
                        f"{sorted(known)}")
    try:
        return config_cls(**{**fields, **overrides})
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from err


def decoder_to_hf(config: Any, model_type: str, architecture: str,
                  dtype: Any = None) -> dict[str, Any]:
    """The config.json fields every decoder family writes; `dtype` (default param_dtype) is the
    stored dtype. Readable by transformers 4 (top-level rope_theta, torch_dtype) and 5
    (rope_parameters, dtype)."""
    dtype_name = jnp.dtype(dtype if dtype is not None else config.param_dtype).name
    c = config
    return {
        "architectures": [architecture], "model_type": model_type, "hidden_act": "silu",
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "tie_word_embeddings": c.tie_word_embeddings, "use_sliding_window": False,
        "sliding_window": None, "max_window_layers": c.num_hidden_layers,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "torch_dtype": dtype_name, "dtype": dtype_name,
    }
