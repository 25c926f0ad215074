"""Off-policy corrections (algorithm.md, "Off-policy corrections") against numbers worked by hand
and a plain-loop numpy reference, and their effect on the loss: the weight on the policy term, the
corrected mask as the loss mask, the mini-batch denominator from the corrected mask."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prorl_jax import loss as L
from test_loss import TIME, random_batch, ref_aggregate, ref_kl, ref_pg

correction_jit = jax.jit(L.importance_correction, static_argnames=("kind", "low", "high"))
STATIC = ("eps_low", "eps_high", "kl_kind", "agg_mode", "clip_c", "norm_len", "policy_loss",
          "correction", "correction_low", "correction_high")
compute_loss_jit = jax.jit(L.compute_loss, static_argnames=STATIC)
BOUNDS = {"none": (None, None), "tis": (None, 2.0), "icepop": (0.5, 5.0),
          "seq_mask": (0.9, 1.1)}


def ref_correction(old_logp, sampler_logp, mask, kind, low, high):
    """algorithm.md's table, token by token and row by row."""
    weight, out = np.ones(mask.shape), np.array(mask, np.float64)
    for b in range(mask.shape[0]):
        ds = [min(max(float(old_logp[b, t]) - float(sampler_logp[b, t]), -20.0), 20.0)
              for t in range(mask.shape[1])]
        kept = [d for d, m in zip(ds, mask[b]) if m]
        g = math.exp(sum(kept) / max(len(kept), 1))
        for t, d in enumerate(ds):
            r = math.exp(d)
            if kind == "tis":
                weight[b, t] = min(r, high)
            elif kind == "icepop":
                out[b, t] *= low <= r <= high
            elif kind == "seq_mask":
                out[b, t] *= low <= g <= high
    return weight, out


def offpolicy_batch(seed):
    """random_batch plus sampler log-probs a mismatch away from old_logp (some far off)."""
    logp, old_logp, ref_logp, adv, mask, entropy = random_batch(seed)
    rng = np.random.default_rng(seed + 100)
    sampler = (old_logp + rng.normal(0, 0.05, old_logp.shape)).astype(np.float32)
    sampler[0, :3] += np.array([2.0, -2.0, 30.0], np.float32)   # r_is 0.14, 7.4, clamp at -20
    sampler[2] += 0.2                                           # one row off as a whole
    return logp, old_logp, ref_logp, adv, mask, entropy, sampler


# ----------------------------------------------------------------------------- the corrections
def test_corrections_hand_values():
    r_is = np.array([[0.4, 1.0, 6.0, 0.6, 3.0]])
    old = np.log(r_is).astype(np.float32)
    sampler = np.zeros_like(old)
    mask = np.array([[1, 1, 1, 1, 0]], np.float32)
    w, m = correction_jit(old, sampler, mask, kind="tis", high=2.0)
    np.testing.assert_allclose(w, [[0.4, 1.0, 2.0, 0.6, 2.0]], rtol=1e-6)
    np.testing.assert_array_equal(m, mask)
    w, m = correction_jit(old, sampler, mask, kind="icepop", low=0.5, high=5.0)
    np.testing.assert_array_equal(w, 1.0)
    np.testing.assert_array_equal(m, [[0, 1, 0, 1, 0]])
    w, m = correction_jit(old, sampler, jnp.asarray(mask, bool), kind="none")
    assert w.dtype == m.dtype == jnp.float32
    np.testing.assert_array_equal(w, 1.0)
    np.testing.assert_array_equal(m, mask)
    # icepop's interval is closed: r_is == 1 exactly is kept by [1, 1]
    _, m = correction_jit(np.zeros((1, 2), np.float32), np.array([[0.0, 1e-3]], np.float32),
                          np.ones((1, 2)), kind="icepop", low=1.0, high=1.0)
    np.testing.assert_array_equal(m, [[1, 0]])


def test_seq_mask_hand_values():
    # row 0: d = [ln 2, -ln 2, 0] -> geometric mean 1, kept; row 1: mean d = 0.01 -> g = 1.01,
    # dropped whole; row 2: its only far-off token is masked out, so it does not count.
    old = np.array([[math.log(2), -math.log(2), 0.0], [0.01, 0.01, 0.01],
                    [0.0, 0.0, 9.0]], np.float32)
    mask = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 0]], np.float32)
    w, m = correction_jit(old, np.zeros_like(old), mask, kind="seq_mask", low=0.999, high=1.002)
    np.testing.assert_array_equal(w, 1.0)
    np.testing.assert_array_equal(m, [[1, 1, 1], [0, 0, 0], [1, 1, 0]])


@pytest.mark.parametrize("kind", ["tis", "icepop", "seq_mask"])
def test_corrections_random_against_reference(kind):
    _, old, _, _, mask, _, sampler = offpolicy_batch(20)
    low, high = BOUNDS[kind]
    w, m = correction_jit(old, sampler, mask, kind=kind, low=low, high=high)
    want_w, want_m = ref_correction(old, sampler, mask, kind, low, high)
    np.testing.assert_allclose(np.asarray(w) * mask, want_w * mask, rtol=1e-5)
    np.testing.assert_array_equal(m, want_m)
    assert 0 < want_m.sum() < mask.sum() or kind == "tis"   # the correction bites here


def test_correction_bad_input_names_the_field():
    x = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="correction='clip'"):
        L.importance_correction(x, x, x, kind="clip")
    with pytest.raises(ValueError, match="'icepop'.*needs low and high"):
        L.importance_correction(x, x, x, kind="icepop", high=5.0)
    with pytest.raises(ValueError, match="'tis'.*needs high"):
        L.importance_correction(x, x, x, kind="tis", low=0.5, high=2.0)
    with pytest.raises(ValueError, match="low=2.0 > high=1.0"):
        L.importance_correction(x, x, x, kind="seq_mask", low=2.0, high=1.0)
    with pytest.raises(ValueError, match="needs sampler_logp"):
        L.importance_correction(x, None, x, kind="tis", high=2.0)


# ----------------------------------------------------------------------------- in the loss
LOSS_KW = dict(eps_low=0.2, eps_high=0.28, beta=0.05)


@pytest.mark.parametrize("kind,mode", [("tis", "token-mean"), ("icepop", "token-mean"),
                                       ("seq_mask", "seq-mean-token-mean"),
                                       ("icepop", "seq-mean-token-sum-norm")])
def test_compute_loss_with_correction_against_reference(kind, mode):
    logp, old, ref, adv, mask, entropy, sampler = offpolicy_batch(21)
    low, high = BOUNDS[kind]
    loss, metrics = compute_loss_jit(logp, old, ref, adv, mask, agg_mode=mode, entropy=entropy,
                                     sampler_logp=sampler, correction=kind, correction_low=low,
                                     correction_high=high, **LOSS_KW)
    weight, cmask = ref_correction(old, sampler, mask, kind, low, high)
    pg = weight * ref_pg(logp, old, adv, 0.2, 0.28)[0]
    kl = ref_kl(logp, ref, "k3")
    assert float(loss) == pytest.approx(ref_aggregate(pg + 0.05 * kl, cmask, mode), rel=1e-5)
    on, kept = mask.astype(bool), cmask.astype(bool)
    d = np.clip(old.astype(np.float64) - sampler, -20, 20)
    want = {"pg_loss": ref_aggregate(pg, cmask, mode), "kl": kl[kept].mean(),
            "entropy": entropy[kept].mean(), "correction/masked_frac": 1 - kept.sum() / on.sum(),
            "correction/weight_mean": weight[kept].mean(),
            "correction/mismatch_abs": np.abs(d)[on].mean(),
            "correction/mismatch_k3": (np.exp(d) - d - 1)[on].mean()}
    for name, value in want.items():
        assert float(metrics[name]) == pytest.approx(value, rel=1e-5, abs=1e-7), name


def test_rejected_tokens_get_no_gradient_and_weights_none():
    """icepop: a rejected token's logp gets exactly zero gradient; tis: the weight scales the
    token's policy gradient and is itself a constant (no gradient to old or sampler logp)."""
    logp, old, ref, adv, mask, _, sampler = offpolicy_batch(22)

    def loss_of(lp, o, s, kind, low, high):
        return L.compute_loss(lp, o, ref, adv, mask, sampler_logp=s, correction=kind,
                              correction_low=low, correction_high=high, **LOSS_KW)[0]
    grad_fn = jax.jit(jax.grad(loss_of, argnums=(0, 1, 2)), static_argnums=(3, 4, 5))
    grads = grad_fn(logp, old, sampler, "icepop", 0.5, 5.0)
    _, cmask = ref_correction(old, sampler, mask, "icepop", 0.5, 5.0)
    rejected = (mask == 1) & (cmask == 0)
    assert rejected.any()
    assert np.all(np.asarray(grads[0])[rejected] == 0.0)
    assert np.all(np.asarray(grads[0])[cmask == 1] != 0.0)
    np.testing.assert_array_equal(grads[1], 0.0)
    np.testing.assert_array_equal(grads[2], 0.0)
    tis = grad_fn(logp, old, sampler, "tis", None, 2.0)
    weight, _ = ref_correction(old, sampler, mask, "tis", None, 2.0)
    pg_grad = ref_pg(logp, old, adv, 0.2, 0.28)[4]
    d = ref.astype(np.float64) - logp
    want = mask * (weight * pg_grad + 0.05 * (1 - np.exp(d))) / mask.sum()
    np.testing.assert_allclose(tis[0], want, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(tis[1], 0.0)
    np.testing.assert_array_equal(tis[2], 0.0)


def test_micro_batches_with_icepop_sum_to_the_mini_batch():
    """The mini-batch's denominator and counts come from its *corrected* mask: micro-batch
    losses, metrics and gradients then sum to the whole mini-batch's; the uncorrected mask's
    denominator would not (a check that can fail)."""
    logp, old, ref, adv, mask, _, sampler = offpolicy_batch(23)
    theta = np.random.default_rng(24).normal(0, 0.1, TIME).astype(np.float32)
    kw = dict(correction="icepop", correction_low=0.8, correction_high=1.25, **LOSS_KW)

    def loss_fn(params, batch, denom=None, counts=None):
        lp, o, r, a, m, s = batch
        return L.compute_loss(lp + params, o, r, a, m, sampler_logp=s, global_denominator=denom,
                              global_counts=counts, **kw)

    batch = (logp, old, ref, adv, mask, sampler)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (full_loss, full_metrics), full_grad = grad_fn(theta, batch)
    assert 0.05 < float(full_metrics["correction/masked_frac"]) < 0.9
    denom, counts = L.loss_normalizers(mask, agg_mode="token-mean", old_logp=old,
                                       sampler_logp=sampler, correction="icepop",
                                       correction_low=0.8, correction_high=1.25)
    parts = 3
    micro = [tuple(a[i::parts] for a in batch) for i in range(parts)]
    outs = [grad_fn(theta, mb, denom, counts) for mb in micro]
    assert sum(float(o[0][0]) for o in outs) == pytest.approx(float(full_loss), rel=1e-5)
    for name in full_metrics:
        total = sum(float(o[0][1][name]) for o in outs)
        assert total == pytest.approx(float(full_metrics[name]), rel=1e-5, abs=1e-7), name
    np.testing.assert_allclose(sum(np.asarray(o[1]) for o in outs), full_grad, rtol=1e-5,
                               atol=1e-8)
    wrong = L.loss_denominator(mask, "token-mean")
    stale = sum(float(grad_fn(theta, mb, wrong, counts)[0][0]) for mb in micro)
    assert abs(stale - float(full_loss)) > 1e-3 * abs(float(full_loss))


def test_correction_none_with_sampler_logp_only_adds_metrics():
    logp, old, ref, adv, mask, _, sampler = offpolicy_batch(25)
    plain, plain_metrics = compute_loss_jit(logp, old, ref, adv, mask, **LOSS_KW)
    loss, metrics = compute_loss_jit(logp, old, ref, adv, mask, sampler_logp=sampler, **LOSS_KW)
    assert float(loss) == float(plain)
    assert float(metrics["correction/masked_frac"]) == 0.0
    assert float(metrics["correction/weight_mean"]) == 1.0
    assert set(metrics) - set(plain_metrics) == {
        "correction/masked_frac", "correction/weight_mean", "correction/mismatch_abs",
        "correction/mismatch_k3"}
