"""Advantage estimators (exact zeros included), the sequence-level policy losses GSPO and CISPO,
the PPO clip's gradient at its ties, and the cosine length reward: against numbers worked by
hand, plain-loop numpy references and torch autograd in float64."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from prorl_jax import loss as L
from test_loss import random_batch, ref_group_advantages

advantages_jit = jax.jit(L.compute_advantages, static_argnames=(
    "estimator", "group_size", "std_normalize", "std_scope", "std_ddof"))
policy_jit = jax.jit(L.policy_loss, static_argnames=("name", "eps_low", "eps_high", "clip_c"))
ESTIMATORS = tuple(L.ADVANTAGE_ESTIMATORS)


def ref_rloo(rewards, n):
    out = []
    for i, r in enumerate(rewards):
        g = i // n
        others = [float(x) for j, x in enumerate(rewards[g * n:(g + 1) * n]) if g * n + j != i]
        out.append(float(r) - sum(others) / len(others) if others else 0.0)
    return np.array(out)


def ref_reinforce_pp(rewards, n, lengths, eps=1e-6):
    a = []
    for g in range(len(rewards) // n):
        group = [float(x) for x in rewards[g * n:(g + 1) * n]]
        a += [x - sum(group) / n for x in group]
    total = float(sum(lengths))
    mu = sum(l * x for l, x in zip(lengths, a)) / total
    sd = math.sqrt(sum(l * (x - mu) ** 2 for l, x in zip(lengths, a)) / total)
    return np.array([(x - mu) / (sd + eps) for x in a])


# ----------------------------------------------------------------------------- advantages
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("n,value", [(16, 0.7), (128, 1 / 3)])
def test_identical_rewards_get_exactly_zero_advantage(estimator, n, value):
    """float32: the plain mean of sixteen 0.7s is an ulp off, and over an ulp-sized std that was
    an advantage of 0.106 (0.056 for 128 x 1/3). Every estimator must give exactly 0."""
    rewards = jnp.full((2 * n,), value, jnp.float32)
    lengths = jnp.arange(2 * n) % 7 + 1
    for scope in ("group", "batch"):
        got = advantages_jit(estimator, rewards, n, lengths=lengths, std_scope=scope)
        assert np.all(np.asarray(got) == 0.0), (scope, np.abs(np.asarray(got)).max())


def test_identical_group_in_a_mixed_batch():
    """grpo and rloo: the identical group's advantages are exactly 0 whatever the rest of the
    batch. reinforce_pp_baseline: its a_i are 0, then the batch whitening shifts them by -mu/sd
    like every response (algorithm.md's formula), matched against the reference."""
    rng = np.random.default_rng(30)
    rewards = rng.random(48).astype(np.float32)
    rewards[16:32] = np.float32(0.7)
    lengths = rng.integers(0, 40, 48)
    for estimator, scope in (("grpo", "group"), ("grpo", "batch"), ("rloo", "group")):
        got = np.asarray(advantages_jit(estimator, rewards, 16, lengths=lengths, std_scope=scope))
        assert np.all(got[16:32] == 0.0) and np.all(got[:16] != 0.0), estimator
    got = advantages_jit("reinforce_pp_baseline", rewards, 16, lengths=lengths)
    np.testing.assert_allclose(got, ref_reinforce_pp(rewards, 16, lengths), rtol=1e-5, atol=1e-6)


def test_rloo_hand_values_and_reference():
    got = advantages_jit("rloo", jnp.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.3]), 4)
    np.testing.assert_allclose(got[:4], [2 / 3, -2 / 3, -2 / 3, 2 / 3], rtol=1e-6)
    # group 2: 0.5 - (0.5 + 0.5 + 0.3) / 3 = 0.0667; 0.3 - 0.5 = -0.2
    np.testing.assert_allclose(got[4:], [0.2 / 3, 0.2 / 3, 0.2 / 3, -0.2], rtol=1e-5)
    rewards = np.random.default_rng(31).random(15).astype(np.float32)
    np.testing.assert_allclose(advantages_jit("rloo", rewards, 5), ref_rloo(rewards, 5),
                               rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(L.rloo_advantages(rewards, 1)) == 0.0)   # no baseline for n = 1


def test_reinforce_pp_baseline_hand_values_and_reference():
    # R = [1, 0], L = [1, 3]: a = [0.5, -0.5], mu = -0.25, sd = sqrt(3) / 4
    got = L.reinforce_pp_baseline_advantages(jnp.array([1.0, 0.0]), 2, jnp.array([1, 3]))
    np.testing.assert_allclose(got, [math.sqrt(3), -1 / math.sqrt(3)], rtol=1e-5)
    rng = np.random.default_rng(32)
    rewards = rng.random(24).astype(np.float32)
    lengths = rng.integers(0, 50, 24)
    lengths[3] = 0   # an overlong-filtered response does not count in mu and sd
    got = advantages_jit("reinforce_pp_baseline", rewards, 4, lengths=lengths)
    np.testing.assert_allclose(got, ref_reinforce_pp(rewards, 4, lengths), rtol=1e-5, atol=1e-6)
    # weighted by tokens: doubling every length changes nothing; changing one does
    np.testing.assert_allclose(advantages_jit("reinforce_pp_baseline", rewards, 4,
                                              lengths=2 * lengths), got, rtol=1e-5)
    other = lengths.copy()
    other[0] += 30
    assert np.abs(np.asarray(advantages_jit("reinforce_pp_baseline", rewards, 4,
                                            lengths=other)) - np.asarray(got)).max() > 1e-3
    empty = L.reinforce_pp_baseline_advantages(rewards, 4, np.zeros(24, np.int32))
    assert np.all(np.asarray(empty) == 0.0)


def test_grpo_by_name_matches_group_advantages():
    rewards = np.random.default_rng(33).random(12).astype(np.float32)
    got = advantages_jit("grpo", rewards, 3, std_scope="batch", std_ddof=0)
    np.testing.assert_allclose(got, ref_group_advantages(rewards, 3, ddof=0, scope="batch"),
                               rtol=1e-5, atol=1e-6)


def test_advantage_estimators_bad_input_names_the_field():
    with pytest.raises(ValueError, match="adv_estimator='ppo'"):
        L.compute_advantages("ppo", jnp.zeros(4), 2)
    with pytest.raises(ValueError, match="needs lengths"):
        L.compute_advantages("reinforce_pp_baseline", jnp.zeros(4), 2)
    with pytest.raises(ValueError, match=r"lengths must be int\[N\] = \[4\]"):
        L.reinforce_pp_baseline_advantages(jnp.zeros(4), 2, jnp.ones(3))


# ----------------------------------------------------------------------------- GSPO and CISPO
def torch_policy_loss(name, logp, old_logp, adv, mask, eps_low, eps_high):
    """Independent float64 torch versions of the two papers' objectives (aggregated: GSPO as a
    mean over responses, CISPO as a token mean); returns (loss, d loss / d logp)."""
    lp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    old = torch.tensor(old_logp, dtype=torch.float64)
    a = torch.tensor(adv, dtype=torch.float64)
    m = torch.tensor(mask, dtype=torch.float64)
    log_r = torch.clamp(lp - old, -20, 20) * m
    if name == "gspo":
        kept = m.sum(1) > 0
        s = torch.exp((log_r.sum(1) / m.sum(1).clamp(min=1)).clamp(-20, 20))
        per_seq = torch.maximum(-a * s, -a * s.clamp(1 - eps_low, 1 + eps_high))
        loss = per_seq[kept].mean()
    else:
        w = torch.exp(log_r).clamp(1 - eps_low, 1 + eps_high).detach()
        loss = (-w * a[:, None] * lp * m).sum() / m.sum()
    loss.backward()
    return loss.item(), lp.grad.numpy()


@pytest.mark.parametrize("name,mode", [("gspo", "seq-mean-token-mean"), ("cispo", "token-mean")])
def test_sequence_losses_match_torch(name, mode):
    logp, old_logp, _, adv, mask, _ = random_batch(34)
    old_logp = (logp + 0.5 * (old_logp - logp)).astype(np.float32)   # ratios near the clip range
    old_logp[0] -= 0.5            # response 0: s = r = e^0.5 with A > 0, clipped above
    adv[0] = 1.0

    def loss_of(lp):
        pg, _ = L.policy_loss(name, lp, old_logp, adv, mask=mask, eps_low=0.2, eps_high=0.28)
        return L.aggregate_loss(pg, mask, mode)
    got, grad = jax.value_and_grad(loss_of)(logp)
    want, want_grad = torch_policy_loss(name, logp, old_logp, adv, mask, 0.2, 0.28)
    assert float(got) == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
    # GSPO's clip zeroes a whole clipped response; CISPO never drops a token
    assert np.all(np.asarray(grad)[0] == 0.0) == (name == "gspo")
    assert np.all(np.asarray(grad)[2:][mask[2:] == 1] != 0.0)


def test_gspo_hand_values():
    # one response, mask [1, 1, 0]: log r = [ln 4, 0] -> s = 2 (the padding's ratio is ignored)
    logp = jnp.array([[math.log(4.0), 0.0, 5.0]] * 2)
    old = jnp.zeros((2, 3))
    mask = jnp.array([[1.0, 1.0, 0.0]] * 2)
    pg, clip = policy_jit("gspo", logp, old, jnp.array([1.0, -1.0]), mask=mask, eps_low=0.2,
                          eps_high=0.4)
    np.testing.assert_allclose(pg[0], [-1.4] * 3, rtol=1e-6)       # A > 0: clipped at 1.4
    np.testing.assert_allclose(pg[1], [2.0] * 3, rtol=1e-6)        # A < 0: max(2, 0.8) = 2
    np.testing.assert_array_equal(clip.upper, [[True] * 3, [False] * 3])
    grad = jax.grad(lambda lp: L.aggregate_loss(L.gspo_loss(
        lp, old, jnp.array([1.0, -1.0]), mask=mask, eps_low=0.2, eps_high=0.4)[0], mask,
        "seq-mean-token-mean"))(logp)
    # response 0 clipped: 0; response 1: -A s m_t / |y| / (2 responses) = 2 * 1 / 2 / 2
    np.testing.assert_allclose(grad, [[0.0, 0.0, 0.0], [0.5, 0.5, 0.0]], rtol=1e-6, atol=0)
    # the dual clip on s: A < 0, s = 2 > clip_c = 1.5 -> pg = -A clip_c = 1.5, no gradient
    pg, clip = policy_jit("gspo", logp, old, jnp.array([1.0, -1.0]), mask=mask, eps_low=0.2,
                          eps_high=0.4, clip_c=1.5)
    np.testing.assert_allclose(pg[1], [1.5] * 3, rtol=1e-6)
    np.testing.assert_array_equal(clip.dual, [[False] * 3, [True] * 3])


def test_cispo_hand_values():
    # r = 2 (A = 1) -> weight 1.4; r = 0.25 (A = -1) -> weight 0.8; gradient -w A, never 0
    logp = jnp.array([[math.log(2.0) - 1.0], [math.log(0.25) - 1.0]])
    old = jnp.array([[-1.0], [-1.0]])
    adv = jnp.array([1.0, -1.0])
    pg, clip = policy_jit("cispo", logp, old, adv, mask=None, eps_low=0.2, eps_high=0.4)
    np.testing.assert_allclose(pg[:, 0], -np.array([1.4, -0.8]) * np.asarray(logp)[:, 0],
                               rtol=1e-6)
    np.testing.assert_array_equal(clip.upper[:, 0], [True, False])
    np.testing.assert_array_equal(clip.lower[:, 0], [False, True])
    grad = jax.grad(lambda lp: jnp.sum(L.cispo_loss(lp, old, adv, eps_low=0.2,
                                                    eps_high=0.4)[0]))(logp)
    np.testing.assert_allclose(grad[:, 0], [-1.4, 0.8], rtol=1e-6)


def test_policy_loss_registry_and_errors():
    logp, old_logp, _, adv, mask, _ = random_batch(35)
    for name, fn in (("ppo", L.policy_gradient_loss), ("cispo", L.cispo_loss)):
        np.testing.assert_array_equal(
            policy_jit(name, logp, old_logp, adv, mask=mask, eps_low=0.2, eps_high=0.28)[0],
            jax.jit(fn, static_argnames=("eps_low", "eps_high"))(
                logp, old_logp, adv, mask=mask, eps_low=0.2, eps_high=0.28)[0])
    with pytest.raises(ValueError, match="policy_loss='grpo'"):
        L.policy_loss("grpo", logp, old_logp, adv, mask=mask, eps_low=0.2, eps_high=0.28)
    with pytest.raises(ValueError, match="clip_c=3.0: the dual clip"):
        L.policy_loss("cispo", logp, old_logp, adv, mask=mask, eps_low=0.2, eps_high=0.28,
                      clip_c=3.0)


# ----------------------------------------------------------------------------- clip ties
def torch_ppo_grad(logp, old_logp, adv, eps_low, eps_high):
    lp = torch.tensor(logp, dtype=torch.float32, requires_grad=True)
    a = torch.tensor(adv, dtype=torch.float32)[:, None]
    r = torch.exp(torch.clamp(lp - torch.tensor(old_logp), -20, 20))
    torch.maximum(-a * r, -a * r.clamp(1 - eps_low, 1 + eps_high)).sum().backward()
    return lp.grad.numpy()


@pytest.mark.parametrize("name", ["ppo", "gspo", "cispo"])
def test_clip_ties_give_the_gradient_as_torch_does(name):
    """eps_low = 0 with r == 1 exactly, and log r == +-20 exactly: torch's clamp passes the whole
    gradient on its closed interval; jnp.clip passed half (0.75 A and e^20 / 2)."""
    logp = np.array([[0.0], [20.0], [-20.0], [0.0]], np.float32)
    old = np.zeros_like(logp)
    adv = np.array([-1.0, -1.0, 1.0, 1.0], np.float32)
    mask = np.ones_like(logp)
    grad = jax.grad(lambda lp: jnp.sum(L.policy_loss(
        name, lp, old, adv, mask=mask, eps_low=0.0, eps_high=0.4)[0]))(logp)
    if name == "cispo":   # the weight is a constant: d pg / d logp = -clip(r) A, r = 1 here
        np.testing.assert_allclose(np.asarray(grad)[[0, 3]], [[1.0], [-1.0]], rtol=1e-6)
        return
    want = torch_ppo_grad(logp, old, adv, 0.0, 0.4)     # one token per row: s_b = r
    np.testing.assert_allclose(want[:, 0], [1.0, math.exp(20), -math.exp(-20), -1.0], rtol=1e-6)
    np.testing.assert_allclose(grad, want, rtol=1e-6)


# ----------------------------------------------------------------------------- cosine length
def test_cosine_length_reward_hand_values():
    lengths = jnp.array([0, 50, 100, 150, 0, 50, 100, 25])
    rewards = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.9])
    got = jax.jit(L.cosine_length_reward, static_argnums=2)(rewards, lengths, 100)
    # correct: 0.5 + 0.5 (1 + cos) / 2 -> 1.0, 0.75, 0.5, 0.5 (capped at L_max);
    # wrong: -0.5 + 0.5 (1 + cos) / 2 -> 0.0, -0.25, -0.5; 0.9 < threshold 1 counts as wrong
    want = [1.0, 0.75, 0.5, 0.5, 0.0, -0.25, -0.5, -0.5 + 0.5 * (1 + math.cos(math.pi / 4)) / 2]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    custom = L.cosine_length_reward(rewards, lengths, 100, correct_threshold=0.5,
                                    correct_range=(2.0, 1.0), wrong_range=(-10.0, 0.0))
    assert float(custom[7]) == pytest.approx(1.0 + (1 + math.cos(math.pi / 4)) / 2, rel=1e-6)
    assert float(custom[5]) == pytest.approx(-10.0 + 10.0 * 0.5, rel=1e-6)
    with pytest.raises(ValueError, match="max_length"):
        L.cosine_length_reward(rewards, lengths, 0)
