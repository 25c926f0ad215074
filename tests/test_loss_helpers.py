"""Overlong handling and the pass@k estimator against numbers worked by hand / exact integers."""
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prorl_jax import loss as L
from prorl_jax.loss import evaluation


def exact_pass_at_k(n, c, k):
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def test_overlong_filter_mask_zeroes_truncated_rows():
    mask = jnp.array([[1, 1, 0], [1, 1, 1], [1, 0, 0]], jnp.float32)
    got = jax.jit(L.overlong_filter_mask)(mask, jnp.array([False, True, False]))
    np.testing.assert_array_equal(got, [[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    assert got.dtype == mask.dtype
    with pytest.raises(ValueError, match=r"truncated must be bool\[batch\]"):
        L.overlong_filter_mask(mask, jnp.array([True, False]))


def test_soft_overlong_penalty_hand_values():
    # max 100 tokens, buffer 20: free up to 80, then linear to -factor at 100
    lengths = jnp.array([10, 80, 85, 90, 100, 120])
    got = jax.jit(L.soft_overlong_penalty, static_argnums=(1, 2))(lengths, 100, 20, 0.5)
    np.testing.assert_allclose(got, [0.0, 0.0, -0.125, -0.25, -0.5, -0.5], rtol=1e-6, atol=0)
    # algorithm.md's formula up to L_max:
    # reward += min(0, -(L - (L_max - buffer)) / buffer * factor)
    for length in range(60, 101):
        want = min(0.0, -(length - (100 - 20)) / 20 * 0.5)
        assert float(L.soft_overlong_penalty(jnp.array([length]), 100, 20, 0.5)[0]) == \
            pytest.approx(want, abs=1e-6)


def test_soft_overlong_penalty_bad_buffer_names_the_field():
    with pytest.raises(ValueError, match="buffer_length"):
        L.soft_overlong_penalty(jnp.array([1]), 100, 0)
    with pytest.raises(ValueError, match="buffer_length=200"):
        L.soft_overlong_penalty(jnp.array([1]), 100, 200)


def test_pass_at_k_hand_values():
    assert L.pass_at_k(10, 3, 2) == pytest.approx(1 - (7 * 6) / (10 * 9), rel=1e-12)
    assert L.pass_at_k(5, 0, 3) == 0.0
    assert L.pass_at_k(5, 5, 1) == 1.0
    assert L.pass_at_k(5, 3, 3) == 1.0                 # n - c < k: every k-subset has a hit
    assert L.pass_at_k(16, 4, 1) == pytest.approx(4 / 16, rel=1e-12)   # pass@1 = c / n


def test_pass_at_k_exact_for_large_n_vectorised(monkeypatch):
    rng = np.random.default_rng(0)
    n = np.array([1024, 1024, 1024, 1024, 128, 1000, 7, 1024])
    c = np.array([0, 1, 512, 1024, 3, 999, 2, 20])
    k = np.array([1, 1024, 100, 1, 128, 500, 5, 1000])
    got = L.pass_at_k(n, c, k)
    assert got.shape == (8,) and got.dtype == np.float64
    for row in range(8):
        assert got[row] == pytest.approx(exact_pass_at_k(n[row], c[row], k[row]), rel=1e-12,
                                         abs=1e-15), row
    # random rows, broadcasting one k over problems
    n = rng.integers(1, 1025, 50)
    c = rng.integers(0, n + 1)
    got = L.pass_at_k(n, c, 1)
    np.testing.assert_allclose(got, c / n, rtol=1e-12)
    # rows are processed in blocks: blocks of 3 rows give the same numbers
    monkeypatch.setattr(evaluation, "ROWS_PER_BLOCK", 3)
    np.testing.assert_allclose(L.pass_at_k(n, c, 1), got, rtol=1e-14)
    tiny = L.pass_at_k(1024, 1, 1)
    assert tiny == pytest.approx(1 / 1024, rel=1e-12)


def test_pass_at_k_bad_counts_name_the_row():
    with pytest.raises(ValueError, match="row 1 .*0 <= c <= n"):
        L.pass_at_k([4, 4], [1, 5], 1)
    with pytest.raises(ValueError, match="row 0 .*1 <= k <= n"):
        L.pass_at_k([4, 4], [1, 2], [5, 1])
    with pytest.raises(ValueError, match="integer"):
        L.pass_at_k(4.0, 1, 1)
