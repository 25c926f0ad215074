"""The GRPO update against an independent numpy computation, micro-batching, non-finite steps,
the no-grad log-prob function, and the reference reset."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prorl_jax import sharding as S
from prorl_jax import train_state as TS
from prorl_jax import update as U
from prorl_jax.models import init_model
from train_helpers import (FAST_COMPILE, MODEL_CFG, OPTIM_CFG, UPDATE_CFG, assert_same_update,
                           forward_logits, fresh_state, graphdef_and_tx, logprob_fn_for,
                           make_batch, mesh_for, train_step_for)

ONE = (1, 1, 1)


def numpy_logprobs(batch, temperature):
    """log softmax(logits / T)[target] and the entropy, from the model's full float32 logits."""
    logits = np.asarray(forward_logits(fresh_state().params, batch["input_ids"]), np.float64) / temperature
    logits -= logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits).sum(-1, keepdims=True))
    logp_all = logits - logz
    logp = np.take_along_axis(logp_all, batch["targets"][..., None], -1)[..., 0]
    entropy = -(np.exp(logp_all) * logp_all).sum(-1)
    return logp, entropy


def numpy_loss(logp, batch, cfg):
    """algorithm.md: clipped ratio with clip-higher + beta * k3, token-mean."""
    a = batch["advantages"][:, None]
    r = np.exp(np.clip(logp - batch["old_logp"], -20, 20))
    pg = np.maximum(-a * r, -a * np.clip(r, 1 - cfg.eps_low, 1 + cfg.eps_high))
    d = np.clip(batch["ref_logp"] - logp, -20, 20)
    kl = np.clip(np.exp(d) - d - 1, -10, 10)
    m = batch["loss_mask"]
    return ((pg + cfg.beta * kl) * m).sum() / m.sum(), (kl * m).sum() / m.sum()


@pytest.fixture(scope="module")
def stepped():
    """One update on one device, the whole mini-batch as one micro-batch."""
    step, sh = train_step_for(ONE)
    state, metrics = step(jax.device_put(fresh_state(), sh), make_batch())
    return jax.tree.map(np.asarray, state), {k: float(v) for k, v in metrics.items()}


def test_loss_and_metrics_match_numpy(stepped):
    _, metrics = stepped
    batch = make_batch()
    logp, entropy = numpy_logprobs(batch, UPDATE_CFG.temperature)
    loss, kl = numpy_loss(logp, batch, UPDATE_CFG)
    m = batch["loss_mask"]
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(metrics["entropy"], (entropy * m).sum() / m.sum(), rtol=1e-5)
    assert metrics["num_tokens"] == m.sum() and metrics["nonfinite"] == 0.0
    assert metrics["lr"] == pytest.approx(OPTIM_CFG.lr)
    assert metrics["clip_frac_lower"] + metrics["clip_frac_upper"] > 0  # clipping exercised


def plain_loss(params, batch):
    """The whole mini-batch's loss with no micro-batching, straight through compute_loss."""
    graphdef = graphdef_and_tx()[0]
    denominator = U.loss_denominator(batch["loss_mask"], UPDATE_CFG.agg_mode)
    counts = U.token_counts(batch["loss_mask"])
    return U.micro_batch_loss(params, graphdef, batch, UPDATE_CFG, denominator, counts)[0]


plain_grad = jax.jit(jax.grad(plain_loss), compiler_options=FAST_COMPILE)


def test_adamw_step_matches_a_hand_computed_first_step(stepped):
    """First AdamW step: m_hat = g, v_hat = g^2, so p' = p - lr * (g / (|g| + eps) + wd * p),
    with g the gradient clipped to global norm max_grad_norm."""
    state, metrics = stepped
    params = fresh_state().params
    grads = plain_grad(params, {k: jnp.asarray(v) for k, v in make_batch().items()})
    norm = np.sqrt(sum(float(np.sum(np.square(g))) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-5)
    scale = min(1.0, OPTIM_CFG.max_grad_norm / norm)
    assert scale < 1.0  # clipping is active with this batch

    def expected(p, g):
        p, g = np.asarray(p, np.float64), np.asarray(g, np.float64) * scale
        return p - OPTIM_CFG.lr * (g / (np.abs(g) + OPTIM_CFG.eps) + OPTIM_CFG.weight_decay * p)
    want = jax.tree.map(expected, params, grads)
    # |g| near eps makes g/(|g|+eps) sensitive; compare where |g| is well above float noise.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=OPTIM_CFG.lr * 2e-2),
                 state.params, want)
    assert int(state.step) == 1 and int(TS.optimizer_count(state.opt_state)) == 1


def test_micro_batching_changes_nothing(stepped):
    state_1x8, metrics_1x8 = stepped
    step, sh = train_step_for(ONE, micro_batch_rows=2)
    state, metrics = step(jax.device_put(fresh_state(), sh), make_batch())
    for k in ("loss", "grad_norm", "kl", "pg_loss", "entropy", "approx_kl", "masked_frac"):
        np.testing.assert_allclose(metrics[k], metrics_1x8[k], rtol=2e-5, atol=1e-7, err_msg=k)
    assert_same_update(state, state_1x8)


def test_micro_batch_split_is_strided_and_invertible():
    x = jnp.arange(8 * 3).reshape(8, 3)
    micro = U.split_micro_batches({"x": x}, 4)["x"]
    assert micro.shape == (4, 2, 3)
    np.testing.assert_array_equal(micro[1], x[jnp.array([1, 5])])
    np.testing.assert_array_equal(U.merge_micro_batches(micro), x)
    with pytest.raises(ValueError, match="micro_batch_rows=3 must divide"):
        U.num_micro_batches(8, 3)
    assert U.num_micro_batches(8, 0) == 1 and U.num_micro_batches(8, 16) == 1


def test_non_finite_step_is_not_applied():
    step, sh = train_step_for(ONE)
    batch = make_batch()
    batch["advantages"][2] = np.nan
    start = jax.device_put(fresh_state(), sh)
    state, metrics = step(start, batch)
    assert metrics["nonfinite"] == 1.0 and not np.isfinite(metrics["loss"])
    assert int(state.step) == 0
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                        (state.params, state.opt_state), (start.params, start.opt_state))
    assert all(jax.tree.leaves(same))


def test_batch_errors_name_the_field():
    step, _ = train_step_for(ONE)
    batch = make_batch()
    del batch["ref_logp"]
    with pytest.raises(ValueError, match="missing 'ref_logp'"):
        step(fresh_state(), batch)
    batch = make_batch()
    batch["advantages"] = batch["advantages"][:, None]
    with pytest.raises(ValueError, match="batch\\['advantages'\\] has shape \\(8, 1\\)"):
        step(fresh_state(), batch)
    batch = make_batch()
    batch["targets"] = batch["targets"].astype(np.float32)
    with pytest.raises(ValueError, match="batch\\['targets'\\] has dtype float32"):
        step(fresh_state(), batch)


def test_logprob_fn_matches_numpy_and_compiles_once_per_bucket():
    logprob_fn = logprob_fn_for(ONE, micro_batch_rows=4)
    params = fresh_state().params
    for seed in (0, 1):  # same shape, new data: no recompilation
        batch = make_batch(seed)
        logp, entropy = logprob_fn(params, batch)
        want_logp, want_entropy = numpy_logprobs(batch, UPDATE_CFG.temperature)
        np.testing.assert_allclose(np.asarray(logp), want_logp, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(entropy), want_entropy, rtol=1e-5, atol=1e-5)
    assert logprob_fn.jitted._cache_size() == 1
    logprob_fn(params, make_batch(time=8))  # a new bucket length compiles once more
    assert logprob_fn.jitted._cache_size() == 2


def test_packed_rows_reach_the_model():
    """Two sequences packed in one row (positions restart, segment ids 1 and 2) give the
    log-probs of the same sequences in rows of their own."""
    logprob_fn = logprob_fn_for(ONE, micro_batch_rows=4)
    params = fresh_state().params
    batch = make_batch(seed=4)
    half = batch["input_ids"].shape[1] // 2
    packed = {k: batch[k].copy() for k in ("input_ids", "targets")}
    packed["input_ids"][:, half:] = batch["input_ids"][:, :half]  # the 2nd copy of the prefix
    packed["targets"][:, half:] = batch["targets"][:, :half]
    rows, time = packed["input_ids"].shape
    t = np.arange(time, dtype=np.int32)
    packed["positions"] = np.broadcast_to(np.where(t < half, t, t - half), (rows, time)).copy()
    packed["segment_ids"] = np.broadcast_to(np.where(t < half, 1, 2).astype(np.int32),
                                            (rows, time)).copy()
    logp = np.asarray(logprob_fn(params, packed)[0])
    plain = np.asarray(logprob_fn(params, batch)[0])
    np.testing.assert_allclose(logp[:, :half - 1], plain[:, :half - 1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logp[:, half:-1], plain[:, :half - 1], rtol=1e-5, atol=1e-5)


def test_reset_reference_copies_policy_zeroes_optimizer_and_kills_kl(stepped):
    trained, _ = stepped
    step, sh = train_step_for(ONE)
    _, tx, schedule = graphdef_and_tx()
    state = jax.device_put(trained, sh)
    assert int(TS.optimizer_count(state.opt_state)) == 1
    new, record = TS.reset_reference(state, tx, step=7, trigger="interval", metrics={"kl": 0.3})
    assert record == {"step": 7, "trigger": "interval", "metrics": {"kl": 0.3}}
    same = jax.tree.map(np.array_equal, jax.tree.map(np.asarray, new.ref_params),
                        jax.tree.map(np.asarray, trained.params))
    assert all(jax.tree.leaves(same))
    fresh = tx.init(trained.params)
    equal = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                         new.opt_state, fresh)
    assert all(jax.tree.leaves(equal)) and int(TS.optimizer_count(new.opt_state)) == 0
    assert int(new.step) == int(trained.step)
    # The next batch: reference log-probs from the reset reference equal the policy's -> KL 0
    # (before the reset, the old reference gives a clearly non-zero KL on the same batch).
    logprob_fn = logprob_fn_for(ONE, micro_batch_rows=4)
    batch = make_batch(seed=3)
    batch["old_logp"] = np.asarray(logprob_fn(new.params, batch)[0])
    batch["ref_logp"] = np.asarray(logprob_fn(state.ref_params, batch)[0])
    assert float(step(state, batch)[1]["kl"]) > 1e-6
    batch["ref_logp"] = np.asarray(logprob_fn(new.ref_params, batch)[0])
    _, metrics = step(new, batch)
    assert abs(float(metrics["kl"])) < 1e-9
    assert float(metrics["lr"]) == pytest.approx(float(schedule(0)))


def test_reset_casts_to_the_reference_dtype_and_schedule_restarts():
    _, tx, _ = graphdef_and_tx()
    state = fresh_state()
    state = state._replace(params=jax.tree.map(lambda p: p + 1.0, state.params),
                           ref_params=TS.cast_tree(state.params, "bfloat16"))
    new, _ = TS.reset_reference(state, tx, step=1, trigger="manual")
    for ref, pol in zip(jax.tree.leaves(new.ref_params), jax.tree.leaves(state.params)):
        assert ref.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(ref), np.asarray(pol.astype(jnp.bfloat16)))
    warm = TS.make_schedule(dataclasses.replace(OPTIM_CFG, warmup_steps=4))
    assert [float(warm(i)) for i in (0, 2, 4, 9)] == pytest.approx(
        [0.0, OPTIM_CFG.lr / 2, OPTIM_CFG.lr, OPTIM_CFG.lr])
    cos = TS.make_schedule(dataclasses.replace(OPTIM_CFG, schedule="cosine", decay_steps=10))
    assert float(cos(0)) == pytest.approx(OPTIM_CFG.lr) and float(cos(10)) == pytest.approx(0)
    assert float(cos(5)) == pytest.approx(OPTIM_CFG.lr / 2)


def test_optim_config_from_run_config_and_errors():
    import ml_collections
    cfg = ml_collections.ConfigDict({"optim": dict(
        lr=2e-6, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, max_grad_norm=1.0,
        warmup_steps=0, schedule="constant", decay_steps=0)})
    assert TS.OptimConfig.from_config(cfg) == TS.OptimConfig()
    with pytest.raises(ValueError, match="optim.schedule='linear'"):
        TS.OptimConfig(schedule="linear")
    with pytest.raises(ValueError, match="decay_steps"):
        TS.OptimConfig(schedule="cosine")


def test_params_are_an_nnx_state_that_merges_back():
    state = fresh_state()
    model = nnx.merge(graphdef_and_tx()[0], state.params)
    assert isinstance(state.params, nnx.State) and model.config.num_hidden_layers == 1


def test_remat_model_gives_the_same_logprobs_and_update(stepped):
    """Gradient checkpointing (remat="full") inside the scans changes nothing but memory."""
    graphdef, _ = TS.split_params(nnx.eval_shape(lambda: init_model(MODEL_CFG.replace(
        remat="full"))))
    mesh = mesh_for(*ONE)
    sh = S.tree_shardings(fresh_state(), mesh)
    cfg = dataclasses.replace(UPDATE_CFG, micro_batch_rows=4)
    logprob_fn = U.make_logprob_fn(graphdef, cfg, mesh=mesh, param_shardings=sh.params,
                                   compiler_options=FAST_COMPILE)
    batch = make_batch()
    np.testing.assert_allclose(np.asarray(logprob_fn(fresh_state().params, batch)[0]),
                               numpy_logprobs(batch, cfg.temperature)[0], rtol=1e-5, atol=1e-5)
    _, tx, schedule = graphdef_and_tx()
    step = U.make_train_step(graphdef, tx, schedule, cfg, mesh=mesh, state_shardings=sh,
                             donate=False, compiler_options=FAST_COMPILE)
    state, metrics = step(jax.device_put(fresh_state(), sh), batch)
    np.testing.assert_allclose(float(metrics["grad_norm"]), stepped[1]["grad_norm"], rtol=2e-5)
    assert_same_update(state, stepped[0])


def test_donating_step_compiles_once_per_bucket_and_consumes_its_input(stepped):
    step, sh = train_step_for(ONE, donate=True)
    state = jax.device_put(jax.tree.map(jnp.copy, fresh_state()), sh)  # own buffers to donate
    first = state
    for seed in range(2):  # new data, same bucket: one compilation
        state, metrics = step(state, make_batch(seed=seed))
    assert step.jitted._cache_size() == 1 and int(state.step) == 2
    leaf = jax.tree.leaves(first.params)[0]
    assert leaf.is_deleted()  # donated: the step reused the input buffers
    assert float(metrics["nonfinite"]) == 0.0
    assert not any(x.is_deleted() for x in jax.tree.leaves(fresh_state()))
