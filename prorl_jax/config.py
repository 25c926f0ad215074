"""Run-config checks and parsing: stages, file lists, and field validation naming the field.

The fields themselves are defined and documented in `configs/prorl.py`.
"""
from __future__ import annotations

import ast
import dataclasses
from typing import Any, Callable

import ml_collections


class ConfigError(ValueError):
    """A config field has a bad value; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stage of the run: `steps` training steps with `overrides` (dotted field -> value)."""
    steps: int
    overrides: tuple[tuple[str, Any], ...] = ()


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string


def parse_stages(cfg: ml_collections.ConfigDict) -> list[Stage]:
    """`"steps=2500;steps=500,rollout.max_response_tokens=16384"` -> [Stage, Stage].

    Empty -> one stage of `total_steps`. `total_steps` is the run's length whatever the stage
    budgets: a shorter run ends inside an earlier stage, a longer one stays in the last stage.
    """
    spec = cfg.stages.strip()
    if not spec:
        return [Stage(cfg.total_steps)]
    stages = []
    for i, part in enumerate(p for p in spec.split(";") if p.strip()):
        fields = {}
        for item in part.split(","):
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"config.stages: stage {i}: {item!r} is not `field=value`")
            fields[key.strip()] = _literal(value.strip())
        steps = fields.pop("steps", None)
        if not isinstance(steps, int) or steps <= 0:
            raise ConfigError(f"config.stages: stage {i} needs `steps=N` with N > 0, got {steps!r}")
        for key in fields:
            _get_field(cfg, key, where=f"config.stages: stage {i}")
        stages.append(Stage(steps, tuple(fields.items())))
    return stages


def _get_field(cfg, dotted: str, *, where: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"{where}: unknown field {dotted!r}")
        node = node[part]
    return node


def stage_config(cfg: ml_collections.ConfigDict, stages: list[Stage],
                 stage_index: int) -> ml_collections.ConfigDict:
    """The config in force during stage `stage_index`: overrides of stages 0..index applied."""
    out = ml_collections.ConfigDict(cfg.to_dict())
    for stage in stages[: stage_index + 1]:
        for key, value in stage.overrides:
            parent, _, leaf = key.rpartition(".")
            node = _get_field(out, parent, where="config.stages") if parent else out
            node[leaf] = value
    validate(out)
    return out


def stage_at(stages: list[Stage], step: int) -> int:
    """Index of the stage that training step `step` (0-based) belongs to."""
    end = 0
    for i, stage in enumerate(stages):
        end += stage.steps
        if step < end:
            return i
    return len(stages) - 1


def parse_weighted_files(spec: str, field: str) -> list[tuple[str, float]]:
    """`"a.jsonl@40,b.parquet@10,c.jsonl"` -> [(path, weight)] (weight 1 when omitted)."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        path, sep, weight = item.rpartition("@")
        if not sep:
            path, weight = item, "1"
        try:
            w = float(weight)
        except ValueError:
            raise ConfigError(f"config.{field}: weight {weight!r} of {path!r} is not a number")
        if w <= 0:
            raise ConfigError(f"config.{field}: weight of {path!r} must be > 0, got {w}")
        out.append((path, w))
    return out


def parse_ints(spec: str, field: str) -> list[int]:
    try:
        return [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"config.{field}: expected comma-separated integers, got {spec!r}")


_CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.ref_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots", "dots_no_batch"),
    "model.attention_impl": ("auto", "xla", "cudnn"),
    "rollout.engine": ("auto", "jax", "vllm"),
    "rollout.old_logp_source": ("trainer", "sampler"),
    "loss.kl_kind": ("k1", "k2", "k3"),
    "loss.agg_mode": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                      "seq-mean-token-sum-norm"),
    "loss.adv_std_scope": ("group", "batch"),
    "reward.think_mode": ("require", "optional"),
    "optim.schedule": ("constant", "cosine"),
}

_RANGES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "total_steps": ("an integer > 0", lambda v: v > 0),
    "rollout.n": ("an integer >= 1", lambda v: v >= 1),
    "rollout.temperature": ("> 0", lambda v: v > 0),
    "rollout.top_p": ("in (0, 1]", lambda v: 0 < v <= 1),
    "rollout.max_response_tokens": ("an integer > 0", lambda v: v > 0),
    "rollout.timeout_s": ("> 0", lambda v: v > 0),
    "batch.prompts_per_step": ("an integer > 0", lambda v: v > 0),
    "batch.mini_batch_prompts": ("an integer > 0", lambda v: v > 0),
    "batch.micro_batch_rows": ("an integer > 0", lambda v: v > 0),
    "batch.max_generation_rounds": ("an integer >= 1", lambda v: v >= 1),
    "batch.length_bucket": ("an integer > 0", lambda v: v > 0),
    "loss.eps_low": ("in [0, 1)", lambda v: 0 <= v < 1),
    "loss.eps_high": ("> 0", lambda v: v > 0),
    "loss.clip_c": ("0 (off) or > 1", lambda v: v == 0 or v > 1),
    "loss.beta": (">= 0", lambda v: v >= 0),
    "loss.norm_len": (">= 0", lambda v: v >= 0),
    "reward.soft_overlong_buffer": (">= 0", lambda v: v >= 0),
    "reward.num_workers": (">= 0", lambda v: v >= 0),
    "reward.timeout_s": ("> 0", lambda v: v > 0),
    "optim.lr": (">= 0", lambda v: v >= 0),
    "optim.weight_decay": (">= 0", lambda v: v >= 0),
    "optim.max_grad_norm": ("> 0", lambda v: v > 0),
    "optim.warmup_steps": (">= 0", lambda v: v >= 0),
    "data.max_prompt_tokens": ("an integer > 0", lambda v: v > 0),
    "reset.interval_steps": (">= 0", lambda v: v >= 0),
    "reset.plateau_patience": (">= 0", lambda v: v >= 0),
    "reset.kl_threshold": (">= 0", lambda v: v >= 0),
    "eval.every_steps": (">= 0", lambda v: v >= 0),
    "eval.n_samples": ("an integer >= 1", lambda v: v >= 1),
    "checkpoint.every_steps": (">= 0", lambda v: v >= 0),
    "checkpoint.keep_last": ("an integer >= 1", lambda v: v >= 1),
    "max_nonfinite_steps": ("an integer >= 1", lambda v: v >= 1),
}


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first bad field; returns None when the config is usable."""
    for key, choices in _CHOICES.items():
        value = _get_field(cfg, key, where="config")
        if value not in choices:
            raise ConfigError(f"config.{key}={value!r}: expected one of {list(choices)}")
    for key, (expected, ok) in _RANGES.items():
        value = _get_field(cfg, key, where="config")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise ConfigError(f"config.{key}={value!r}: expected {expected}")
    b = cfg.batch
    if b.prompts_per_step % b.mini_batch_prompts:
        raise ConfigError(f"config.batch.mini_batch_prompts={b.mini_batch_prompts} must divide "
                          f"config.batch.prompts_per_step={b.prompts_per_step}")
    rows = b.mini_batch_prompts * cfg.rollout.n
    if rows % b.micro_batch_rows and b.micro_batch_rows < rows:
        raise ConfigError(f"config.batch.micro_batch_rows={b.micro_batch_rows} must divide the "
                          f"mini-batch's {rows} rows (mini_batch_prompts x rollout.n)")
    if b.dynamic_sampling and cfg.rollout.n < 2:
        raise ConfigError("config.rollout.n must be >= 2 with config.batch.dynamic_sampling")
    if cfg.rollout.engine == "vllm" and not cfg.rollout.vllm_urls.strip():
        raise ConfigError("config.rollout.engine='vllm' needs config.rollout.vllm_urls")
    if not cfg.model.path and not cfg.model.preset:
        raise ConfigError("config.model.path or config.model.preset must be set")
    if not cfg.data.train_files.strip() and not cfg.data.toy_task:
        raise ConfigError("config.data.train_files is empty (and no config.data.toy_task)")
    parse_weighted_files(cfg.data.train_files, "data.train_files")
    parse_weighted_files(cfg.data.val_files, "data.val_files")
    ks = parse_ints(cfg.eval.k_values, "eval.k_values")
    if any(k < 1 or k > cfg.eval.n_samples for k in ks):
        raise ConfigError(f"config.eval.k_values={cfg.eval.k_values!r}: each k must be in "
                          f"[1, eval.n_samples={cfg.eval.n_samples}]")
    parse_stages(cfg)
