"""The jitted, sharded GRPO update and the no-grad log-prob functions.

Batch (a dict; every row right-padded to one bucket length T; dim 0 is rows):
    input_ids   int32[B, T]   prompt + response tokens
    targets     int32[B, T]   input_ids shifted left by one (the last column arbitrary)
    loss_mask   f32[B, T]     1 where targets[b, t] is a response token that counts
    advantages  f32[B]        one advantage per response
    old_logp    f32[B, T]     log pi_old(targets), aligned with targets
    ref_logp    f32[B, T]     log pi_ref(targets)
    positions, segment_ids    optional int32[B, T], for packed / left-padded rows
    sampler_logp              optional f32[B, T], the engine's log-probs of the targets (needed
                              by an off-policy correction; with it the loss logs the mismatch)

One `train_step(state, batch)` call is one optimizer step on one mini-batch. The rows are split
into B / micro_batch_rows micro-batches (row m, m + M, m + 2M, ... go to micro-batch m, so every
micro-batch keeps the row sharding); a lax.scan sums the fp32 gradients of

    loss_m = numerator(token_loss of micro-batch m) / D,   D = loss_denominator(whole mini-batch)

so sum_m loss_m is the mini-batch loss of prorl_jax.loss.compute_loss and sum_m grad_m its
gradient (the mini-batch's normalisation, not each micro-batch's; with an off-policy correction
D is that of the whole mini-batch's corrected mask, `loss.loss_normalizers`). Then the gradient is clipped
to max_grad_norm and AdamW is applied - unless the loss or the gradient norm is not finite, in
which case params, opt_state and step are returned unchanged and metrics["nonfinite"] = 1.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from prorl_jax.fields import ConfigError, Section, above, at_least, field, int_at_least
from prorl_jax.loss import (AGG_MODES, CORRECTIONS, DEFAULT_CHUNK_SIZE, KL_KINDS, POLICY_LOSSES,
                            compute_loss, loss_normalizers, token_logprobs)
from prorl_jax.loss import loss_denominator, token_counts  # noqa: F401 (used as U.* by tests)
from prorl_jax.rollout.base import SAMPLING_TEMPERATURE
from prorl_jax.sharding import batch_sharding, batch_shards, replicated
from prorl_jax.train_state import TrainState, optimizer_count

LOGPROB_KEYS = ("input_ids", "targets")
TRAIN_KEYS = LOGPROB_KEYS + ("loss_mask", "advantages", "old_logp", "ref_logp")
POSITION_KEYS = ("positions", "segment_ids")
OPTIONAL_KEYS = POSITION_KEYS + ("sampler_logp",)


@dataclasses.dataclass(frozen=True)
class UpdateConfig(Section):
    """The loss and the batching of one update (ProRL values as defaults); each field is read
    from the run-config key named on it (configs/prorl.py documents them) and checked here.

    eps_low, eps_high: clip range of the ratio, [1 - eps_low, 1 + eps_high] (0.2, 0.4);
    beta: KL coefficient (1e-4); kl_kind: loss.KL_KINDS (k3); agg_mode: loss.AGG_MODES
    (token-mean); clip_c: dual-clip constant (> 1) or None (config 0); entropy_coef: entropy
    bonus (0); norm_len: the fixed length of seq-mean-token-sum-norm (None, config 0:
    max_response_tokens, see `seq_norm_len`); temperature: sampling temperature, applied to the
    logits before log-softmax (paper 1.2); micro_batch_rows: rows per gradient-accumulation
    micro-batch (0: the whole mini-batch); logprob_chunk: tokens per chunk of the fused LM-head
    log-softmax; kl_clamp: clamp d and every KL estimate (v2's k2); policy_loss:
    loss.POLICY_LOSSES (ppo; gspo needs agg_mode seq-mean-token-mean; cispo has no dual clip);
    correction, correction_low, correction_high: the off-policy correction (loss.CORRECTIONS)
    and its bounds on r_is (each kind takes the bounds CORRECTIONS names; the others unused);
    max_response_tokens: the rollout's response limit.
    """
    eps_low: float = field("loss.eps_low", 0.2, "in [0, 1)", lambda v: 0 <= v < 1)
    eps_high: float = field("loss.eps_high", 0.4, *above(0))
    beta: float = field("loss.beta", 1e-4, *at_least(0))
    kl_kind: str = field("loss.kl_kind", "k3", choices=KL_KINDS)
    agg_mode: str = field("loss.agg_mode", "token-mean", choices=AGG_MODES)
    clip_c: Optional[float] = field("loss.clip_c", None, "0 (off) or > 1", lambda v: v > 1,
                                    off=0)
    entropy_coef: float = field("loss.entropy_coef", 0.0, "a number", lambda v: True)
    norm_len: Optional[int] = field("loss.norm_len", None, "0 (off) or an integer > 0",
                                    int_at_least(1)[1], off=0)
    temperature: float = field("rollout.temperature", 1.0, *SAMPLING_TEMPERATURE)
    micro_batch_rows: int = field("batch.micro_batch_rows", 0, *int_at_least(0))
    logprob_chunk: int = field("model.logprob_chunk", DEFAULT_CHUNK_SIZE, *int_at_least(1))
    kl_clamp: bool = field("loss.kl_clamp", False)
    policy_loss: str = field("loss.policy_loss", "ppo", choices=tuple(POLICY_LOSSES))
    correction: str = field("loss.correction", "none", choices=tuple(CORRECTIONS))
    correction_low: float = field("loss.correction_low", 0.5, *above(0))
    correction_high: float = field("loss.correction_high", 5.0, *above(0))
    max_response_tokens: int = field("rollout.max_response_tokens", 8192, *int_at_least(1))

    def check(self):
        if self.policy_loss == "gspo" and self.agg_mode != "seq-mean-token-mean":
            raise ConfigError(f"config.loss.policy_loss='gspo' averages over responses: it needs "
                              f"config.loss.agg_mode='seq-mean-token-mean', got {self.agg_mode!r}")
        if self.clip_c is not None and self.policy_loss not in ("ppo", "gspo"):
            raise ConfigError(f"config.loss.clip_c={self.clip_c}: the dual clip is defined for "
                              f"config.loss.policy_loss 'ppo' and 'gspo' only, got "
                              f"{self.policy_loss!r}")
        low, high = self.correction_bounds()
        if low is not None and high is not None and low > high:
            raise ConfigError(f"config.loss.correction_low={low} must not exceed "
                              f"config.loss.correction_high={high} "
                              f"(correction={self.correction!r})")

    def correction_bounds(self) -> tuple[Optional[float], Optional[float]]:
        """(low, high) as importance_correction takes them: None for a bound the kind lacks."""
        bounds = CORRECTIONS[self.correction].bounds
        return (self.correction_low if "low" in bounds else None,
                self.correction_high if "high" in bounds else None)

    @property
    def seq_norm_len(self) -> int:
        """The fixed length of seq-mean-token-sum-norm: norm_len, else max_response_tokens."""
        return self.norm_len or self.max_response_tokens


def check_batch(batch: Mapping[str, Any], keys=TRAIN_KEYS) -> None:
    """Raises ValueError naming the field if a batch array is missing or has the wrong shape."""
    for key in keys:
        if key not in batch:
            raise ValueError(f"batch is missing {key!r} (has {sorted(batch)}); expected {keys}")
    rows, time = np.shape(batch["input_ids"])
    for key in tuple(keys) + OPTIONAL_KEYS:
        if key not in batch:
            continue
        want = (rows,) if key == "advantages" else (rows, time)
        if tuple(np.shape(batch[key])) != want:
            raise ValueError(f"batch[{key!r}] has shape {tuple(np.shape(batch[key]))}; expected "
                             f"{want} ([batch, time] of input_ids, advantages [batch])")
        integer = key in LOGPROB_KEYS + POSITION_KEYS
        if integer != jnp.issubdtype(batch[key].dtype, jnp.integer):
            raise ValueError(f"batch[{key!r}] has dtype {batch[key].dtype}; expected "
                             f"{'int32' if integer else 'float32'}")


def num_micro_batches(rows: int, micro_batch_rows: int) -> int:
    """rows / micro_batch_rows (1 when micro_batch_rows is 0 or >= rows); must divide."""
    if micro_batch_rows <= 0 or micro_batch_rows >= rows:
        return 1
    if rows % micro_batch_rows:
        raise ValueError(f"micro_batch_rows={micro_batch_rows} must divide the mini-batch's "
                         f"{rows} rows")
    return rows // micro_batch_rows


def split_micro_batches(batch: Mapping[str, jax.Array], num: int) -> dict:
    """[B, ...] -> [num, B / num, ...]: micro-batch m holds rows m, m + num, m + 2 num, ..."""
    def split(x):
        x = x.reshape((x.shape[0] // num, num) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return {k: split(v) for k, v in batch.items()}


def merge_micro_batches(x: jax.Array) -> jax.Array:
    """Inverse of split_micro_batches for one array: [num, B / num, ...] -> [B, ...]."""
    x = jnp.swapaxes(x, 0, 1)
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def policy_logprobs(graphdef: nnx.GraphDef, params: nnx.State, batch: Mapping[str, jax.Array],
                    cfg: UpdateConfig) -> tuple[jax.Array, jax.Array]:
    """(logp f32[B, T], entropy f32[B, T]) of batch["targets"] under softmax(logits / T)."""
    model = nnx.merge(graphdef, params)
    hidden = model.hidden_states(batch["input_ids"], batch.get("positions"),
                                 batch.get("segment_ids"))
    return token_logprobs(hidden, model.head_kernel(), batch["targets"],
                          temperature=cfg.temperature, chunk_size=cfg.logprob_chunk)


def micro_batch_loss(params: nnx.State, graphdef: nnx.GraphDef, batch: Mapping[str, jax.Array],
                     cfg: UpdateConfig, denominator: jax.Array, counts) -> tuple[jax.Array, dict]:
    """This micro-batch's share of the mini-batch loss (and its sum-friendly metrics)."""
    logp, entropy = policy_logprobs(graphdef, params, batch, cfg)
    if cfg.entropy_coef == 0:  # a metric only: no backward pass through the entropy
        entropy = jax.lax.stop_gradient(entropy)
    low, high = cfg.correction_bounds()
    return compute_loss(
        logp, batch["old_logp"], batch["ref_logp"], batch["advantages"], batch["loss_mask"],
        eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta, kl_kind=cfg.kl_kind,
        kl_clamp=cfg.kl_clamp, agg_mode=cfg.agg_mode, policy_loss=cfg.policy_loss,
        clip_c=cfg.clip_c, entropy=entropy, entropy_coef=cfg.entropy_coef,
        norm_len=cfg.seq_norm_len, sampler_logp=batch.get("sampler_logp"),
        correction=cfg.correction, correction_low=low, correction_high=high,
        global_denominator=denominator, global_counts=counts)


def mini_batch_normalizers(batch: Mapping[str, jax.Array], cfg: UpdateConfig):
    """(denominator, TokenCounts) of the whole mini-batch, from its loss mask after the
    off-policy correction (loss.loss_normalizers); every micro-batch divides by these."""
    low, high = cfg.correction_bounds()
    return loss_normalizers(batch["loss_mask"], agg_mode=cfg.agg_mode, norm_len=cfg.seq_norm_len,
                            old_logp=batch["old_logp"], sampler_logp=batch.get("sampler_logp"),
                            correction=cfg.correction, correction_low=low,
                            correction_high=high)


def accumulate_gradients(params: nnx.State, graphdef: nnx.GraphDef, batch: Mapping[str, Any],
                         cfg: UpdateConfig, grad_shardings: Optional[Any] = None):
    """(loss, metrics, grads f32) of the whole mini-batch, summed over micro-batches in a scan
    (a single micro-batch: computed directly, without an accumulator)."""
    rows = batch["input_ids"].shape[0]
    num = num_micro_batches(rows, cfg.micro_batch_rows)
    denominator, counts = mini_batch_normalizers(batch, cfg)
    grad_fn = jax.value_and_grad(micro_batch_loss, has_aux=True)
    if num == 1:  # no accumulator: one set of gradients in memory
        (loss, metrics), grads = grad_fn(params, graphdef, batch, cfg, denominator, counts)
        return loss, metrics, jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    micro = split_micro_batches(batch, num)

    def body(carry, mb):
        (loss, metrics), grads = grad_fn(params, graphdef, mb, cfg, denominator, counts)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda: grad_fn(params, graphdef, first, cfg, denominator, counts))
    (loss_s, metrics_s), grads_s = shapes
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), (loss_s, metrics_s, grads_s))
    if grad_shardings is not None:
        zeros = (*zeros[:2], jax.lax.with_sharding_constraint(zeros[2], grad_shardings))
    (loss, metrics, grads), _ = jax.lax.scan(body, zeros, micro)
    return loss, metrics, grads


def train_step_fn(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                  schedule: optax.Schedule, cfg: UpdateConfig,
                  grad_shardings: Optional[Any] = None) -> Callable:
    """The un-jitted update: (state, batch) -> (state, metrics); see the module docstring."""
    def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
        loss, metrics, grads = accumulate_gradients(state.params, graphdef, batch, cfg,
                                                    grad_shardings)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        lr = schedule(optimizer_count(state.opt_state))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_state = state._replace(
            params=jax.tree.map(keep, params, state.params),
            opt_state=jax.tree.map(keep, opt_state, state.opt_state),
            step=state.step + finite.astype(jnp.int32))
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=jnp.asarray(lr, jnp.float32),
                       nonfinite=1.0 - finite.astype(jnp.float32),
                       num_tokens=jnp.sum(batch["loss_mask"].astype(jnp.float32)))
        return new_state, metrics
    return train_step


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, cfg: UpdateConfig, *, mesh: Mesh,
                    state_shardings: TrainState, donate: bool = True,
                    compiler_options: Optional[dict] = None) -> Callable:
    """jax.jit of `train_step_fn` with explicit shardings: state by `state_shardings`, batch rows
    over ("data", "fsdp"), metrics replicated; the input state is donated when `donate`;
    compiler_options go to XLA (e.g. {"xla_backend_optimization_level": 0} for quick compiles).
    Compiles once per batch shape (bucket). Returns train_step(state, batch) -> (state, metrics)."""
    jitted = jax.jit(train_step_fn(graphdef, tx, schedule, cfg, state_shardings.params),
                     in_shardings=(state_shardings, batch_sharding(mesh)),
                     out_shardings=(state_shardings, replicated(mesh)),
                     donate_argnums=(0,) if donate else (), compiler_options=compiler_options)
    shards = batch_shards(mesh)

    def train_step(state: TrainState, batch: Mapping[str, Any]):
        check_batch(batch)
        _check_rows(batch, cfg, shards)
        if cfg.correction != "none" and "sampler_logp" not in batch:
            raise ValueError(f"loss.correction={cfg.correction!r} needs batch['sampler_logp'] "
                             "[B, T] (the engine's log-probs of the targets)")
        keys = TRAIN_KEYS + tuple(k for k in OPTIONAL_KEYS if k in batch)
        return jitted(state, {k: batch[k] for k in keys})
    train_step.jitted = jitted
    return train_step


def make_logprob_fn(graphdef: nnx.GraphDef, cfg: UpdateConfig, *, mesh: Mesh,
                    param_shardings: Any, compiler_options: Optional[dict] = None) -> Callable:
    """Jitted, gradient-free logprob_fn(params, batch) -> (logp f32[B, T], entropy f32[B, T]),
    micro-batched like the update (lax.map over micro-batches). For the old policy (the policy's
    params) and the reference (ref_params, e.g. bf16); compiles once per (shape, dtype)."""
    def logprobs(params, batch):
        num = num_micro_batches(batch["input_ids"].shape[0], cfg.micro_batch_rows)
        micro = split_micro_batches(batch, num)
        logp, entropy = jax.lax.map(lambda mb: policy_logprobs(graphdef, params, mb, cfg),
                                    micro)
        return merge_micro_batches(logp), merge_micro_batches(entropy)

    rows = batch_sharding(mesh)
    jitted = jax.jit(logprobs, in_shardings=(param_shardings, rows), out_shardings=rows,
                     compiler_options=compiler_options)
    shards = batch_shards(mesh)

    def logprob_fn(params: nnx.State, batch: Mapping[str, Any]):
        check_batch(batch, LOGPROB_KEYS)
        _check_rows(batch, cfg, shards)
        keys = LOGPROB_KEYS + tuple(k for k in POSITION_KEYS if k in batch)
        return jitted(params, {k: batch[k] for k in keys})
    logprob_fn.jitted = jitted
    return logprob_fn


def _check_rows(batch: Mapping[str, Any], cfg: UpdateConfig, shards: int) -> None:
    rows = np.shape(batch["input_ids"])[0]
    if rows % shards:
        raise ValueError(f"batch has {rows} rows; expected a multiple of data*fsdp = {shards} "
                         "(rows are split over those mesh axes)")
    num_micro_batches(rows, cfg.micro_batch_rows)
