"""The training state (policy, reference, AdamW state, step), the optimizer, and ProRL's
reference reset.

    TrainState = (params      nnx.State of the policy, fp32 master weights,
                  ref_params  nnx.State of the reference policy pi_ref (bf16 by default),
                  opt_state   optax state of clip_by_global_norm -> AdamW,
                  step        int32[], optimizer steps applied)

(No RNG: the update is deterministic and the sampling seeds derive from config.seed and the
step, so a resumed run draws what a straight run draws.)

Reference reset (ProRL, algorithm.md): pi_ref <- pi_theta, and the optimizer state is
re-initialised (Adam moments and counts to zero, so the learning-rate schedule and its warm-up
restart).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from prorl_jax.fields import ConfigError, Section, above, at_least, field, int_at_least

SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimConfig(Section):
    """AdamW with global-norm clipping (ProRL: lr 2e-6 constant), from config.optim.

    lr: peak learning rate; weight_decay: decoupled AdamW decay; b1, b2, eps: Adam;
    max_grad_norm: clip the gradient to this global L2 norm; warmup_steps: linear warm-up from 0
    (restarts after every reference reset); schedule: SCHEDULES, "constant" or "cosine" (to 0
    over decay_steps after the warm-up).
    """
    lr: float = field("optim.lr", 2e-6, *at_least(0))
    weight_decay: float = field("optim.weight_decay", 0.01, *at_least(0))
    b1: float = field("optim.b1", 0.9, "in [0, 1)", lambda v: 0 <= v < 1)
    b2: float = field("optim.b2", 0.999, "in [0, 1)", lambda v: 0 <= v < 1)
    eps: float = field("optim.eps", 1e-8, *above(0))
    max_grad_norm: float = field("optim.max_grad_norm", 1.0, *above(0))
    warmup_steps: int = field("optim.warmup_steps", 0, *int_at_least(0))
    schedule: str = field("optim.schedule", "constant", choices=SCHEDULES)
    decay_steps: int = field("optim.decay_steps", 0, *int_at_least(0))

    def check(self):
        if self.schedule == "cosine" and self.decay_steps <= 0:
            raise ConfigError(f"config.optim.decay_steps={self.decay_steps}: the cosine "
                              "schedule needs decay_steps > 0")


DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class PrecisionConfig(Section):
    """Dtypes of the run, from config.model: dtype (the policy's compute), param_dtype (its
    master weights, in TrainState.params), ref_dtype (the reference's stored weights, in
    TrainState.ref_params); each one of DTYPES."""
    dtype: str = field("model.dtype", "bfloat16", choices=DTYPES)
    param_dtype: str = field("model.param_dtype", "float32", choices=DTYPES)
    ref_dtype: str = field("model.ref_dtype", "bfloat16", choices=DTYPES)


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """lr(count): linear warm-up 0 -> lr over warmup_steps, then constant or cosine to 0."""
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, cfg.lr, max(cfg.warmup_steps, 0), cfg.warmup_steps + cfg.decay_steps, 0.0)
    if cfg.warmup_steps > 0:
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), optax.constant_schedule(cfg.lr)],
            [cfg.warmup_steps])
    return optax.constant_schedule(cfg.lr)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(max_grad_norm) -> adamw(schedule, b1, b2, eps, weight_decay)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay))


def optimizer_count(opt_state: Any) -> jax.Array:
    """Updates applied since the optimizer state was (re-)initialised: Adam's count, int32[]."""
    counts = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    if not counts:
        raise ValueError("optimizer state has no 'count' leaf (expected optax's adam state)")
    return counts[0][1]


class TrainState(NamedTuple):
    """See the module docstring. A pytree; shardings are a TrainState of NamedShardings."""
    params: nnx.State
    ref_params: nnx.State
    opt_state: Any
    step: jax.Array


def cast_tree(tree: Any, dtype) -> Any:
    """Every floating-point leaf cast to dtype (others untouched), always as a new buffer: a
    same-dtype astype would alias the input, and the update donates params and ref_params."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(
        lambda x: jnp.array(x, dtype=dtype, copy=True)
        if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def init_train_state(params: nnx.State, tx: optax.GradientTransformation, *,
                     ref_dtype="bfloat16") -> TrainState:
    """The state at step 0: reference = policy cast to ref_dtype, fresh optimizer state."""
    return TrainState(params=params, ref_params=cast_tree(params, ref_dtype),
                      opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params): the static model structure and its nnx.Param leaves."""
    return nnx.split(model, nnx.Param)


def abstract_state(tree: Any, shardings: Any) -> Any:
    """`tree` (arrays or jax.ShapeDtypeStruct, e.g. a TrainState) as ShapeDtypeStructs that
    carry `shardings` (a matching tree): the target a checkpoint restore reads into."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def reset_reference(state: TrainState, tx: optax.GradientTransformation, *, step: int,
                    trigger: str, metrics: Optional[Mapping[str, Any]] = None
                    ) -> tuple[TrainState, dict]:
    """ProRL's reference reset: ref_params <- params (cast to the reference's dtype, leaf by
    leaf, keeping its sharding), opt_state <- tx.init(params) (moments and counts zero, so the
    schedule restarts). step is kept.

    Returns (new_state, record) with record = {"step", "trigger", "metrics"} (JSON-friendly).
    """
    ref_dtypes = jax.tree.map(lambda r: r.dtype, state.ref_params)
    out_shardings = jax.tree.map(lambda x: x.sharding, (state.ref_params, state.opt_state))

    def fresh(params):
        ref = jax.tree.map(lambda p, d: p.astype(d), params, ref_dtypes)
        return ref, tx.init(params)

    ref_params, opt_state = jax.jit(fresh, out_shardings=out_shardings)(state.params)
    record = {"step": int(step), "trigger": str(trigger),
              "metrics": {k: _to_python(v) for k, v in (metrics or {}).items()}}
    return state._replace(ref_params=ref_params, opt_state=opt_state), record


def _to_python(v: Any) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)
