"""Validation pass@k per domain, on numbers worked by hand."""
import numpy as np
import pytest

from prorl_jax.evaluation import pass_at_k_by_domain


def test_pass_at_k_by_domain_hand_numbers():
    # Two math problems (n=4): 1 and 4 correct; one code problem: rewards 0.5 never count.
    rewards = np.array([1, 0, 0, 0, 1, 1, 1, 1, 0.5, 0.5, 1.0, 0], np.float32)
    out = pass_at_k_by_domain(["math", "math", "code"], rewards, 4, [1, 2])
    # pass@1 = c/n; pass@2 = 1 - C(n-c,2)/C(n,2): c=1 -> 1 - 3/6 = 0.5; c=4 -> 1.
    assert out["val/math/pass@1"] == pytest.approx((0.25 + 1.0) / 2)
    assert out["val/math/pass@2"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["val/code/pass@1"] == pytest.approx(0.25)
    assert out["val/code/pass@2"] == pytest.approx(0.5)
    assert out["val/code/reward"] == pytest.approx(0.5)
    assert out["val/pass@1"] == pytest.approx((0.625 + 0.25) / 2)
