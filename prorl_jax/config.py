"""The run config: its stages, its file lists, and `validate`, which builds every component's
config dataclass once so that a bad field stops the run at start-up with its name.

The fields are defined and documented in `configs/prorl.py`; each one's choices or range is
declared on the dataclass of the component that uses it (prorl_jax.fields):

    loss.* (the loss terms), rollout.temperature,   UpdateConfig     prorl_jax/update.py
      batch.micro_batch_rows, model.logprob_chunk
    loss.adv_*                                      AdvantageConfig  prorl_jax/batching.py
    batch.*, reward.*                               BatchConfig, RewardConfig  (batching.py)
    optim.*; model.dtype, param_dtype, ref_dtype    OptimConfig, PrecisionConfig (train_state)
    mesh.*                                          MeshConfig       prorl_jax/sharding.py
    rollout.*                                       RolloutConfig    prorl_jax/rollout/base.py
    reset.*                                         ResetConfig      prorl_jax/resets.py
    eval.*                                          EvalConfig       prorl_jax/evaluation.py
    checkpoint.*                                    CheckpointConfig prorl_jax/checkpoint.py
    seed, total_steps, max_nonfinite_steps, log.*   RunConfig        here
`validate` adds the checks across components and of model.* and data.* (read by build.py).
"""
from __future__ import annotations

import ast
import dataclasses
import typing
from typing import Any, NamedTuple

import ml_collections

from prorl_jax.checkpoint import CheckpointConfig
from prorl_jax.evaluation import EvalConfig
from prorl_jax.fields import (ConfigError, Section, check_value, field, get_field,
                              int_at_least, parse_ints)
from prorl_jax.batching import AdvantageConfig, BatchConfig, RewardConfig
from prorl_jax.models.decoder import ATTENTION_IMPLS, REMAT_POLICIES
from prorl_jax.resets import ResetConfig
from prorl_jax.rollout.scheduler import BatchingConfig
from prorl_jax.rollout.base import RolloutConfig
from prorl_jax.sharding import MeshConfig
from prorl_jax.train_state import OptimConfig, PrecisionConfig
from prorl_jax.update import UpdateConfig

__all__ = ["ConfigError", "RunConfig", "Settings", "Stage", "parse_ints", "parse_stages",
           "parse_weighted_files", "settings", "stage_at", "stage_config", "validate"]


@dataclasses.dataclass(frozen=True)
class RunConfig(Section):
    """The loop's own fields: seed, total_steps (the run's length, whatever the stages),
    max_nonfinite_steps (stop after this many bad steps in a row), log_every_steps (console
    interval), tensorboard."""
    seed: int = field("seed", 0, *int_at_least(0))
    total_steps: int = field("total_steps", 3000, *int_at_least(1))
    max_nonfinite_steps: int = field("max_nonfinite_steps", 3, *int_at_least(1))
    log_every_steps: int = field("log.every_steps", 1, *int_at_least(1))
    tensorboard: bool = field("log.tensorboard", True)


class Settings(NamedTuple):
    """Every component's config dataclass of one run config (built in this order, so the first
    bad field is the one named)."""
    run: RunConfig
    precision: PrecisionConfig
    rollout: RolloutConfig
    sampler: BatchingConfig
    batch: BatchConfig
    update: UpdateConfig
    advantage: AdvantageConfig
    reward: RewardConfig
    optim: OptimConfig
    mesh: MeshConfig
    reset: ResetConfig
    eval: EvalConfig
    checkpoint: CheckpointConfig


def settings(cfg: ml_collections.ConfigDict) -> Settings:
    """The Settings of `cfg`; ConfigError naming the first bad field."""
    classes = typing.get_type_hints(Settings)
    return Settings(**{name: classes[name].from_config(cfg) for name in Settings._fields})


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
            get_field(cfg, key, where=f"config.stages: stage {i}")
        stages.append(Stage(steps, tuple(fields.items())))
    return stages


def stage_config(cfg: ml_collections.ConfigDict, stages: list[Stage],
                 stage_index: int) -> ml_collections.ConfigDict:
    """The config in force during stage `stage_index`: overrides of stages 0..index applied."""
    out = ml_collections.ConfigDict(cfg.to_dict())
    for stage in stages[: stage_index + 1]:
        for key, value in stage.overrides:
            parent, _, leaf = key.rpartition(".")
            node = get_field(out, parent, where="config.stages") if parent else out
            node[leaf] = value
    try:
        _validate_fields(out)
    except ConfigError as e:
        raise ConfigError(f"config.stages: stage {stage_index}: {e}") from None
    return out


def stage_at(stages: list[Stage], step: int) -> int:
    """Index of the stage that training step `step` (0-based) belongs to."""
    end = 0
    for i, stage in enumerate(stages):
        end += stage.steps
        if step < end:
            return i
    return len(stages) - 1


def parse_weighted_files(spec: str, key: str) -> list[tuple[str, float]]:
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
            raise ConfigError(f"config.{key}: weight {weight!r} of {path!r} is not a number")
        if w <= 0:
            raise ConfigError(f"config.{key}: weight of {path!r} must be > 0, got {w}")
        out.append((path, w))
    return out


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first bad field (of the config, or of a stage's config
    with its overrides applied); returns None when the config is usable."""
    _validate_fields(cfg)
    stages = parse_stages(cfg)
    for i in range(len(stages)):
        stage_config(cfg, stages, i)
    for i, stage in enumerate(stages):  # the pipeline's schedule is the run's, not a stage's
        if any(key == "rollout.max_staleness" for key, _ in stage.overrides):
            raise ConfigError(f"config.stages: stage {i}: rollout.max_staleness is set for "
                              f"the whole run (config.rollout.max_staleness), not per stage")


def _validate_fields(cfg: ml_collections.ConfigDict) -> Settings:
    s = settings(cfg)
    check_value("model.remat", cfg.model.remat, choices=REMAT_POLICIES)
    check_value("model.attention_impl", cfg.model.attention_impl, choices=ATTENTION_IMPLS)
    check_value("data.max_prompt_tokens", cfg.data.max_prompt_tokens, *int_at_least(1))
    for key in ("data.toy_train_size", "data.toy_val_size"):
        check_value(key, get_field(cfg, key), *int_at_least(0))
    rollout, batch, reward = s.rollout, s.batch, s.reward
    rows = batch.mini_batch_prompts * rollout.n
    micro = s.update.micro_batch_rows
    if 0 < micro < rows and rows % micro:
        raise ConfigError(f"config.batch.micro_batch_rows={micro} must divide the "
                          f"mini-batch's {rows} rows (mini_batch_prompts x rollout.n)")
    if s.update.correction != "none" and rollout.old_logp_source != "trainer":
        raise ConfigError(f"config.loss.correction={s.update.correction!r} corrects old_logp "
                          "(the trainer's) towards the sampler's log-probs: it needs "
                          "config.rollout.old_logp_source='trainer', got "
                          f"{rollout.old_logp_source!r}")
    if batch.dynamic_sampling and rollout.n < 2:
        raise ConfigError("config.rollout.n must be >= 2 with config.batch.dynamic_sampling")
    if reward.soft_overlong_buffer > rollout.max_response_tokens:
        raise ConfigError(f"config.reward.soft_overlong_buffer={reward.soft_overlong_buffer} "
                          f"must not exceed config.rollout.max_response_tokens="
                          f"{rollout.max_response_tokens}")
    if not cfg.model.path and not cfg.model.preset:
        raise ConfigError("config.model.path or config.model.preset must be set")
    if not cfg.data.train_files.strip() and not cfg.data.toy_task:
        raise ConfigError("config.data.train_files is empty (and no config.data.toy_task)")
    parse_weighted_files(cfg.data.train_files, "data.train_files")
    parse_weighted_files(cfg.data.val_files, "data.val_files")
    return s
