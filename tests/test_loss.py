"""The ProRL loss formulas against numbers worked by hand and an independent numpy reference.

The reference below is written from algorithm.md with plain loops and the `statistics` module,
sharing no code with prorl_jax.loss.
"""
import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prorl_jax import loss as L

BATCH, TIME = 6, 7
GROUP = 3


# ----------------------------------------------------------------------------- numpy reference
def ref_group_advantages(rewards, n, std_normalize=True, eps=1e-6, ddof=1, scope="group"):
    def std(xs):
        if len(xs) <= ddof:
            return 0.0
        return statistics.stdev(xs) if ddof == 1 else statistics.pstdev(xs)
    rewards = [float(r) for r in rewards]
    out = []
    for g in range(len(rewards) // n):
        group = rewards[g * n:(g + 1) * n]
        mean = sum(group) / n
        scale = (std(group) if scope == "group" else std(rewards)) + eps
        out += [(r - mean) / scale if std_normalize else r - mean for r in group]
    return np.array(out)


def ref_kl(logp, ref_logp, kind):
    out = np.zeros(logp.shape)
    for idx in np.ndindex(logp.shape):
        d = float(ref_logp[idx]) - float(logp[idx])
        if kind == "k1":
            out[idx] = -d
        elif kind == "k2":
            out[idx] = d * d / 2
        else:
            d = min(max(d, -20.0), 20.0)
            out[idx] = min(max(math.exp(d) - d - 1, -10.0), 10.0)
    return out


def ref_pg(logp, old_logp, adv, eps_low, eps_high, clip_c=None):
    """Returns pg, upper, lower, dual, and d(pg)/d(logp), token by token."""
    pg, grad = np.zeros(logp.shape), np.zeros(logp.shape)
    upper, lower, dual = (np.zeros(logp.shape, bool) for _ in range(3))
    for i, t in np.ndindex(logp.shape):
        a = float(adv[i])
        lr = min(max(float(logp[i, t]) - float(old_logp[i, t]), -20.0), 20.0)
        r = math.exp(lr)
        r_clipped = min(max(r, 1 - eps_low), 1 + eps_high)
        value, g = (-a * r, -a * r) if -a * r >= -a * r_clipped else (-a * r_clipped, 0.0)
        if clip_c is not None and a < 0 and value > -a * clip_c:
            value, g, dual[i, t] = -a * clip_c, 0.0, True
        pg[i, t], grad[i, t] = value, g
        upper[i, t] = r > 1 + eps_high and a > 0
        lower[i, t] = r < 1 - eps_low and a < 0
    return pg, upper, lower, dual, grad


def ref_aggregate(values, mask, mode, norm_len=None):
    rows = []
    for v_row, m_row in zip(values, mask):
        count = sum(m_row)
        total = sum(float(v) for v, m in zip(v_row, m_row) if m)
        rows.append((total, count))
    total = sum(t for t, _ in rows)
    if mode == "token-mean":
        return total / max(sum(c for _, c in rows), 1)
    if mode == "seq-mean-token-sum-norm":
        return total / (len(rows) * (norm_len or values.shape[1]))
    kept = [(t, c) for t, c in rows if c > 0]
    if mode == "seq-mean-token-mean":
        return sum(t / c for t, c in kept) / max(len(kept), 1)
    return sum(t for t, _ in kept) / max(len(kept), 1)


# ----------------------------------------------------------------------------- shared data
def random_batch(seed, batch=BATCH, time=TIME):
    rng = np.random.default_rng(seed)
    logp = -rng.exponential(1.0, (batch, time)).astype(np.float32)
    old_logp = (logp + rng.normal(0, 0.4, (batch, time))).astype(np.float32)
    ref_logp = (logp + rng.normal(0, 0.6, (batch, time))).astype(np.float32)
    adv = rng.normal(0, 1.0, batch).astype(np.float32)
    mask = (rng.random((batch, time)) < 0.7).astype(np.float32)
    mask[1] = 0.0  # a response dropped whole (e.g. overlong filtering)
    entropy = rng.exponential(1.0, (batch, time)).astype(np.float32)
    return logp, old_logp, ref_logp, adv, mask, entropy


group_advantages_jit = jax.jit(L.group_advantages, static_argnames=(
    "group_size", "std_normalize", "std_ddof", "std_scope"))
kl_jit = jax.jit(L.kl_estimate, static_argnames="kind")
pg_jit = jax.jit(L.policy_gradient_loss, static_argnames=("eps_low", "eps_high", "clip_c"))
aggregate_jit = jax.jit(L.aggregate_loss, static_argnames=("mode", "norm_len"))
STATIC_LOSS_ARGS = ("eps_low", "eps_high", "kl_kind", "agg_mode", "clip_c", "norm_len")
compute_loss_jit = jax.jit(L.compute_loss, static_argnames=STATIC_LOSS_ARGS)


# ----------------------------------------------------------------------------- advantages
def test_group_advantages_worked_example():
    rewards = jnp.array([1.0, 0.8, 0.0, 0.4])
    sample_std = math.sqrt((0.45**2 + 0.25**2 + 0.55**2 + 0.15**2) / 3)   # 0.44347
    population_std = math.sqrt((0.45**2 + 0.25**2 + 0.55**2 + 0.15**2) / 4)  # 0.38406
    assert abs(sample_std - 0.443) < 5e-4 and abs(population_std - 0.384) < 5e-4
    centered = np.array([0.45, 0.25, -0.55, -0.15])
    np.testing.assert_allclose(group_advantages_jit(rewards, 4), centered / (sample_std + 1e-6),
                               rtol=1e-5)
    np.testing.assert_allclose(group_advantages_jit(rewards, 4, std_ddof=0),
                               centered / (population_std + 1e-6), rtol=1e-5)
    np.testing.assert_allclose(group_advantages_jit(rewards, 4, std_normalize=False), centered,
                               atol=1e-6)


@pytest.mark.parametrize("std_normalize,ddof,scope", [
    (True, 1, "group"), (True, 0, "group"), (True, 1, "batch"), (True, 0, "batch"),
    (False, 1, "group")])
def test_group_advantages_random_against_reference(std_normalize, ddof, scope):
    rewards = np.random.default_rng(1).random(12).astype(np.float32)
    rewards[3:6] = 1.0  # a group with all rewards equal: advantages 0, not NaN
    got = group_advantages_jit(rewards, GROUP, std_normalize=std_normalize, std_ddof=ddof,
                               std_scope=scope)
    want = ref_group_advantages(rewards, GROUP, std_normalize, ddof=ddof, scope=scope)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got)[3:6] == 0.0)


def test_group_advantages_accepts_numpy_ints_and_host_arrays():
    rewards = np.array([1.0, 0.8, 0.0, 0.4], np.float64)
    np.testing.assert_allclose(L.group_advantages(rewards, np.int64(4)),
                               group_advantages_jit(jnp.asarray(rewards, jnp.float32), 4),
                               rtol=1e-6)


def test_group_advantages_single_response_groups_are_zero_not_nan():
    got = group_advantages_jit(jnp.array([0.0, 1.0, 0.5]), 1)
    assert np.all(np.isfinite(got)) and np.all(np.asarray(got) == 0.0)


def test_group_advantages_bad_input_names_the_field():
    with pytest.raises(ValueError, match="group_size=4"):
        L.group_advantages(jnp.zeros(6), 4)
    with pytest.raises(ValueError, match="std_scope"):
        L.group_advantages(jnp.zeros(4), 2, std_scope="global")
    with pytest.raises(ValueError, match="rewards must be"):
        L.group_advantages(jnp.zeros((2, 2)), 2)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        L.group_advantages(jnp.zeros(4), 2.0)


def test_group_signal_mask_keeps_groups_with_unequal_rewards():
    rewards = jnp.array([0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.3, 0.3, 0.31])
    np.testing.assert_array_equal(jax.jit(L.group_signal_mask, static_argnums=1)(rewards, 3),
                                  [False, True, False, True])
    np.testing.assert_array_equal(L.group_signal_mask(rewards, 3, atol=0.05),
                                  [False, True, False, False])


# ----------------------------------------------------------------------------- KL
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimators_against_reference(kind):
    logp, _, ref_logp, *_ = random_batch(2)
    ref_logp[0, :3] = [-30.0, 25.0, 3.0]   # exercise the k3 clamps on d and on the result
    logp[0, :3] = [0.0, 0.0, -5.0]
    np.testing.assert_allclose(kl_jit(logp, ref_logp, kind), ref_kl(logp, ref_logp, kind),
                               rtol=1e-5, atol=1e-6)


def test_kl_hand_values():
    logp, ref_logp = jnp.array([[math.log(0.5)]]), jnp.array([[math.log(0.25)]])
    d = math.log(0.5)  # ref_logp - logp
    assert float(kl_jit(logp, ref_logp, "k1")[0, 0]) == pytest.approx(-d, rel=1e-6)
    assert float(kl_jit(logp, ref_logp, "k2")[0, 0]) == pytest.approx(d * d / 2, rel=1e-6)
    assert float(kl_jit(logp, ref_logp, "k3")[0, 0]) == pytest.approx(0.5 - d - 1, rel=1e-6)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "k1+", "k3+"])
def test_kl_gradients_flow_through_logp_only(kind):
    logp, _, ref_logp, *_ = random_batch(3)
    grad_logp, grad_ref = jax.grad(lambda a, b: jnp.sum(L.kl_estimate(a, b, kind)),
                                   argnums=(0, 1))(logp, ref_logp)
    d = ref_logp.astype(np.float64) - logp
    analytic = {"k1": np.ones_like(d), "k2": -d, "k3": 1.0 - np.exp(d)}
    want = analytic["k2"] if kind.endswith("+") else analytic[kind]
    np.testing.assert_allclose(grad_logp, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(grad_ref, 0.0)


@pytest.mark.parametrize("kind", ["k1+", "k3+"])
def test_kl_straight_through_value_is_the_estimator(kind):
    logp, _, ref_logp, *_ = random_batch(4)
    np.testing.assert_allclose(kl_jit(logp, ref_logp, kind), ref_kl(logp, ref_logp, kind[:2]),
                               rtol=1e-5, atol=1e-6)


def test_kl_unknown_kind_names_the_field():
    with pytest.raises(ValueError, match="kl_kind='k4'"):
        L.kl_estimate(jnp.zeros((1, 1)), jnp.zeros((1, 1)), "k4")


# ----------------------------------------------------------------------------- policy loss
def test_policy_loss_worked_examples():
    logp = jnp.log(jnp.array([[2.0], [2.0], [0.25], [1.1]]))
    adv = jnp.array([1.46, 1.46, -1.0, 0.5])
    pg, clip = pg_jit(logp, jnp.zeros((4, 1)), adv, eps_low=0.2, eps_high=0.4)
    # A > 0, r = 2 -> clipped at 1.4; A < 0, r = 0.25 -> clipped at 0.8; r = 1.1 inside.
    np.testing.assert_allclose(pg[:, 0], [-1.46 * 1.4, -1.46 * 1.4, 1.0 * 0.8, -0.5 * 1.1],
                               rtol=1e-6)
    np.testing.assert_array_equal(clip.upper[:, 0], [True, True, False, False])
    np.testing.assert_array_equal(clip.lower[:, 0], [False, False, True, False])
    pg_sym, _ = pg_jit(logp, jnp.zeros((4, 1)), adv, eps_low=0.2, eps_high=0.2)
    assert float(pg_sym[0, 0]) == pytest.approx(-1.46 * 1.2, rel=1e-6)
    grad = jax.grad(lambda lp: jnp.sum(L.policy_gradient_loss(
        lp, jnp.zeros((4, 1)), adv, eps_low=0.2, eps_high=0.4)[0]))(logp)
    np.testing.assert_allclose(grad[:, 0], [0.0, 0.0, 0.0, -0.5 * 1.1], rtol=1e-6, atol=0)


def test_policy_loss_dual_clip_hand_values():
    # A = -1, r = 5: PPO gives max(5, 0.8) = 5; the dual clip with c = 3 caps it at 3.
    logp = jnp.log(jnp.array([[5.0, 2.0]]))
    pg, clip = pg_jit(logp, jnp.zeros((1, 2)), jnp.array([-1.0]), eps_low=0.2, eps_high=0.4,
                      clip_c=3.0)
    np.testing.assert_allclose(pg, [[3.0, 2.0]], rtol=1e-6)
    np.testing.assert_array_equal(clip.dual, [[True, False]])
    # the dual clip never touches A > 0
    pg_pos, clip_pos = pg_jit(logp, jnp.zeros((1, 2)), jnp.array([1.0]), eps_low=0.2,
                              eps_high=0.4, clip_c=3.0)
    np.testing.assert_allclose(pg_pos, [[-1.4, -1.4]], rtol=1e-6)
    assert not np.any(clip_pos.dual)


@pytest.mark.parametrize("clip_c", [None, 1.5])
def test_policy_loss_random_against_reference(clip_c):
    logp, old_logp, _, adv, *_ = random_batch(5)
    old_logp[2, 0] = logp[2, 0] + 30.0   # log-ratio clamp at -20
    pg, clip = pg_jit(logp, old_logp, adv, eps_low=0.2, eps_high=0.28, clip_c=clip_c)
    want, upper, lower, dual, _ = ref_pg(logp, old_logp, adv, 0.2, 0.28, clip_c)
    np.testing.assert_allclose(pg, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(clip.upper, upper)
    np.testing.assert_array_equal(clip.lower, lower)
    np.testing.assert_array_equal(clip.dual, dual)
    assert upper.any() and lower.any() and (clip_c is None or dual.any())


@pytest.mark.parametrize("clip_c", [None, 1.5])
def test_policy_loss_gradient_zero_where_clipped(clip_c):
    logp, old_logp, _, adv, *_ = random_batch(6)
    def total(lp, old):
        return jnp.sum(L.policy_gradient_loss(lp, old, adv, eps_low=0.2, eps_high=0.28,
                                              clip_c=clip_c)[0])
    grad_logp, grad_old = jax.jit(jax.grad(total, argnums=(0, 1)))(logp, old_logp)
    _, upper, lower, dual, want = ref_pg(logp, old_logp, adv, 0.2, 0.28, clip_c)
    np.testing.assert_allclose(grad_logp, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(grad_logp)[upper | lower | dual] == 0.0)
    assert np.all(np.asarray(grad_logp)[~(upper | lower | dual)] != 0.0)
    np.testing.assert_array_equal(grad_old, 0.0)


def test_policy_loss_bad_input_names_the_field():
    with pytest.raises(ValueError, match="clip_c"):
        L.policy_gradient_loss(jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.ones(1), eps_low=0.2,
                               eps_high=0.4, clip_c=0.5)
    with pytest.raises(ValueError, match="advantages must be"):
        L.policy_gradient_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones(3), eps_low=0.2,
                               eps_high=0.4)
    with pytest.raises(ValueError, match="eps_low"):
        L.policy_gradient_loss(jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.ones(1), eps_low=1.2,
                               eps_high=0.4)


# ----------------------------------------------------------------------------- aggregation
@pytest.mark.parametrize("mode", L.AGG_MODES)
def test_aggregate_random_against_reference(mode):
    values, *_, mask, _ = random_batch(7)
    np.testing.assert_allclose(aggregate_jit(values, mask, mode), ref_aggregate(values, mask, mode),
                               rtol=1e-5)
    if mode == "seq-mean-token-sum-norm":
        np.testing.assert_allclose(aggregate_jit(values, mask, mode, norm_len=16),
                                   ref_aggregate(values, mask, mode, norm_len=16), rtol=1e-5)


def test_aggregate_hand_values():
    values = jnp.array([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0], [7.0, 7.0, 7.0]])
    mask = jnp.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert float(L.aggregate_loss(values, mask, "token-mean")) == pytest.approx(10 / 4)
    assert float(L.aggregate_loss(values, mask, "seq-mean-token-mean")) == \
        pytest.approx((2 + 4) / 2)
    assert float(L.aggregate_loss(values, mask, "seq-mean-token-sum")) == pytest.approx((6 + 4) / 2)
    assert float(L.aggregate_loss(values, mask, "seq-mean-token-sum-norm", norm_len=5)) == \
        pytest.approx(10 / (3 * 5))
    assert float(L.aggregate_loss(values, jnp.zeros((3, 3)), "token-mean")) == 0.0
    # masked positions may hold inf/NaN (e.g. padding) without poisoning the loss
    poisoned = values.at[2, 0].set(jnp.nan).at[1, 1].set(jnp.inf)
    assert float(L.aggregate_loss(poisoned, mask, "token-mean")) == pytest.approx(10 / 4)


def test_aggregate_bad_mode_names_the_field():
    with pytest.raises(ValueError, match="agg_mode='mean'"):
        L.aggregate_loss(jnp.zeros((2, 2)), jnp.ones((2, 2)), "mean")
    with pytest.raises(ValueError, match="mask"):
        L.aggregate_loss(jnp.zeros((2, 2)), jnp.ones((2, 3)), "token-mean")


# ----------------------------------------------------------------------------- the full loss
LOSS_KW = dict(eps_low=0.2, eps_high=0.28, beta=0.05, clip_c=2.0)


@pytest.mark.parametrize("mode,kind", [("token-mean", "k3"), ("seq-mean-token-mean", "k1"),
                                       ("seq-mean-token-sum", "k2"),
                                       ("seq-mean-token-sum-norm", "k3")])
def test_compute_loss_against_reference(mode, kind):
    logp, old_logp, ref_logp, adv, mask, entropy = random_batch(8)
    loss, metrics = compute_loss_jit(logp, old_logp, ref_logp, adv, mask, kl_kind=kind,
                                     agg_mode=mode, entropy=entropy, entropy_coef=0.01, **LOSS_KW)
    pg, upper, lower, dual, _ = ref_pg(logp, old_logp, adv, 0.2, 0.28, 2.0)
    kl = ref_kl(logp, ref_logp, kind)
    token_loss = pg + 0.05 * kl - 0.01 * entropy
    assert float(loss) == pytest.approx(ref_aggregate(token_loss, mask, mode), rel=1e-5)
    on = mask.astype(bool)
    log_ratio = logp.astype(np.float64) - old_logp
    want = {"pg_loss": ref_aggregate(pg, mask, mode), "kl": kl[on].mean(),
            "entropy": entropy[on].mean(), "clip_frac_upper": upper[on].mean(),
            "clip_frac_lower": lower[on].mean(), "clip_frac_dual": dual[on].mean(),
            "approx_kl": (np.exp(log_ratio) - 1 - log_ratio)[on].mean(),
            "masked_frac": 1.0 - on.mean()}
    assert set(metrics) == set(want)
    for name, value in want.items():
        assert float(metrics[name]) == pytest.approx(value, rel=1e-5, abs=1e-7), name


def test_compute_loss_gradient_only_through_logp_and_entropy():
    logp, old_logp, ref_logp, adv, mask, entropy = random_batch(9)
    def loss_of(*args):
        return L.compute_loss(*args[:3], adv, mask, entropy=args[3], entropy_coef=0.01,
                              **LOSS_KW)[0]
    grads = jax.grad(loss_of, argnums=(0, 1, 2, 3))(logp, old_logp, ref_logp, entropy)
    _, _, _, _, pg_grad = ref_pg(logp, old_logp, adv, 0.2, 0.28, 2.0)
    d = ref_logp.astype(np.float64) - logp
    count = mask.sum()
    np.testing.assert_allclose(grads[0], mask * (pg_grad + 0.05 * (1 - np.exp(d))) / count,
                               rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(grads[1], 0.0)
    np.testing.assert_array_equal(grads[2], 0.0)
    np.testing.assert_allclose(grads[3], -0.01 * mask / count, rtol=1e-5)


def test_compute_loss_needs_entropy_for_entropy_coef():
    x = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="entropy_coef"):
        L.compute_loss(x, x, x, jnp.ones(1), jnp.ones((1, 2)), entropy_coef=0.1, **LOSS_KW)


@pytest.mark.parametrize("mode", L.AGG_MODES)
def test_micro_batches_sum_to_the_mini_batch(mode):
    """Losses, metrics and parameter gradients of micro-batches, each normalised by the
    mini-batch's loss_denominator / token_counts, sum to the mini-batch's (in a lax.scan, as the
    train step does). The "parameters" theta [time] shift every response's logp."""
    logp, old_logp, ref_logp, adv, mask, entropy = random_batch(10)
    theta = np.random.default_rng(11).normal(0, 0.1, TIME).astype(np.float32)
    kw = dict(agg_mode=mode, norm_len=9, entropy_coef=0.01, **LOSS_KW)

    def loss_fn(params, batch, denom=None, counts=None):
        lp, old, ref, a, m, ent = batch
        return L.compute_loss(lp + params, old, ref, a, m, entropy=ent, global_denominator=denom,
                              global_counts=counts, **kw)

    batch = (logp, old_logp, ref_logp, adv, mask, entropy)
    (full_loss, full_metrics), full_grad = jax.value_and_grad(loss_fn, has_aux=True)(theta, batch)
    denom = L.loss_denominator(mask, mode, norm_len=9)
    counts = L.token_counts(mask)
    parts = 3
    micro_batches = tuple(a.reshape(parts, BATCH // parts, *a.shape[1:]) for a in batch)

    def micro_step(carry, micro):
        (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(theta, micro, denom,
                                                                          counts)
        return jax.tree.map(jnp.add, carry, (loss, metrics, grad)), None

    zero = jax.tree.map(jnp.zeros_like, (full_loss, full_metrics, full_grad))
    (loss_sum, metric_sums, grad_sum), _ = jax.jit(
        lambda mb: jax.lax.scan(micro_step, zero, mb))(micro_batches)
    assert float(loss_sum) == pytest.approx(float(full_loss), rel=1e-5)
    for name in full_metrics:
        assert float(metric_sums[name]) == pytest.approx(float(full_metrics[name]), rel=1e-5,
                                                         abs=1e-7), name
    np.testing.assert_allclose(grad_sum, full_grad, rtol=1e-5, atol=1e-8)
    assert np.abs(np.asarray(full_grad)).max() > 1e-3
    # without the mini-batch normaliser the micro-batch losses do not add up (test can fail)
    local = sum(float(loss_fn(theta, tuple(a[i] for a in micro_batches))[0]) for i in range(parts))
    assert abs(local - float(full_loss)) > 1e-4


def test_compute_loss_takes_traced_hyperparameters():
    """eps_low, eps_high, beta, clip_c and entropy_coef may be traced (changed without a
    recompile); the result equals the static one."""
    logp, old_logp, ref_logp, adv, mask, entropy = random_batch(12)
    def loss_of(hyper):
        return L.compute_loss(logp, old_logp, ref_logp, adv, mask, entropy=entropy,
                              eps_low=hyper[0], eps_high=hyper[1], beta=hyper[2],
                              clip_c=hyper[3], entropy_coef=hyper[4])[0]
    traced = jax.jit(loss_of)(jnp.array([0.2, 0.28, 0.05, 2.0, 0.01]))
    static, _ = compute_loss_jit(logp, old_logp, ref_logp, adv, mask, entropy=entropy,
                                 entropy_coef=0.01, **LOSS_KW)
    assert float(traced) == pytest.approx(float(static), rel=1e-6)


def test_compute_loss_matches_torch_autograd():
    """An independent implementation in torch (float64 autograd): ProRL's default loss
    (token-mean, k3, eps 0.2 / 0.28, dual clip) and its gradient w.r.t. logp."""
    import torch
    logp, old_logp, ref_logp, adv, mask, _ = random_batch(13)
    lp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    old = torch.tensor(old_logp, dtype=torch.float64)
    ref = torch.tensor(ref_logp, dtype=torch.float64)
    a = torch.tensor(adv, dtype=torch.float64)[:, None]
    m = torch.tensor(mask, dtype=torch.float64)
    ratio = torch.exp(torch.clamp(lp - old, -20, 20))
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.28))
    pg = torch.where(a < 0, torch.minimum(pg, -a * 2.0), pg)
    d = torch.clamp(ref - lp, -20, 20)
    kl = torch.clamp(torch.exp(d) - d - 1, -10, 10)
    loss = ((pg + 0.05 * kl) * m).sum() / m.sum()
    loss.backward()
    got, got_grad = jax.value_and_grad(lambda x: L.compute_loss(
        x, old_logp, ref_logp, adv, mask, **LOSS_KW)[0])(logp)
    assert float(got) == pytest.approx(loss.item(), rel=1e-5)
    np.testing.assert_allclose(got_grad, lp.grad.numpy(), rtol=1e-4, atol=1e-7)
