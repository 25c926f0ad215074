"""The training state (policy, reference, AdamW state, step, RNG), the optimizer, and ProRL's
reference reset.

    TrainState = (params      nnx.State of the policy, fp32 master weights,
                  ref_params  nnx.State of the reference policy pi_ref (bf16 by default),
                  opt_state   optax state of clip_by_global_norm -> AdamW,
                  step        int32[], optimizer steps applied,
                  rng         uint32[2], a raw PRNG key)

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

SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with global-norm clipping (ProRL: lr 2e-6 constant).

    lr: peak learning rate; weight_decay: decoupled AdamW decay; b1, b2, eps: Adam;
    max_grad_norm: clip the gradient to this global L2 norm; warmup_steps: linear warm-up from 0
    (restarts after every reference reset); schedule: "constant" or "cosine" (to 0 over
    decay_steps after the warm-up).
    """
    lr: float = 2e-6
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"
    decay_steps: int = 0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r}: expected one of {SCHEDULES}")
        if self.schedule == "cosine" and self.decay_steps <= 0:
            raise ValueError(f"optim.decay_steps={self.decay_steps}: the cosine schedule needs "
                             "decay_steps > 0")
        if self.warmup_steps < 0 or self.max_grad_norm <= 0 or self.lr < 0:
            raise ValueError(f"optim: expected warmup_steps >= 0, max_grad_norm > 0, lr >= 0; "
                             f"got {self.warmup_steps}, {self.max_grad_norm}, {self.lr}")

    @classmethod
    def from_config(cls, cfg: Any) -> "OptimConfig":
        """From config.optim (a ConfigDict, a mapping or an object with these fields)."""
        get = cfg.get if isinstance(cfg, Mapping) else lambda k, d: getattr(cfg, k, d)
        kw = {}
        for f in dataclasses.fields(cls):
            value = get(f.name, f.default)
            kw[f.name] = value if f.type == "str" else type(f.default)(value)
        return cls(**kw)


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
    rng: jax.Array


def cast_tree(tree: Any, dtype) -> Any:
    """Every floating-point leaf cast to dtype (others untouched), always as a new buffer: a
    same-dtype astype would alias the input, and the update donates params and ref_params."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(
        lambda x: jnp.array(x, dtype=dtype, copy=True)
        if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def init_train_state(params: nnx.State, tx: optax.GradientTransformation, *,
                     ref_dtype="bfloat16", seed: int = 0) -> TrainState:
    """The state at step 0: reference = policy cast to ref_dtype, fresh optimizer state."""
    return TrainState(params=params, ref_params=cast_tree(params, ref_dtype),
                      opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                      rng=jax.random.PRNGKey(seed))


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params): the static model structure and its nnx.Param leaves."""
    return nnx.split(model, nnx.Param)


def abstract_train_state(model_fn, tx: optax.GradientTransformation, *,
                         ref_dtype="bfloat16", shardings: Optional[Any] = None):
    """(graphdef, TrainState of jax.ShapeDtypeStruct) without allocating anything.

    model_fn: () -> nnx.Module (e.g. lambda: init_model(cfg)). shardings: an optional function
    tree -> tree of shardings (e.g. functools.partial(tree_shardings, mesh=mesh)) attached to
    every leaf, as checkpoint restore onto a mesh needs.
    """
    abstract_model = nnx.eval_shape(model_fn)
    graphdef, params = split_params(abstract_model)
    state = jax.eval_shape(lambda p: init_train_state(p, tx, ref_dtype=ref_dtype), params)
    if shardings is not None:
        state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                             state, shardings(state))
    return graphdef, state


def reset_reference(state: TrainState, tx: optax.GradientTransformation, *, step: int,
                    trigger: str, metrics: Optional[Mapping[str, Any]] = None
                    ) -> tuple[TrainState, dict]:
    """ProRL's reference reset: ref_params <- params (cast to the reference's dtype, leaf by
    leaf, keeping its sharding), opt_state <- tx.init(params) (moments and counts zero, so the
    schedule restarts). step and rng are kept.

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
