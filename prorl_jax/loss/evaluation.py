"""The unbiased pass@k estimator (Chen et al. 2021), host-side numpy, for evaluation.

    pass@k = 1 - C(n - c, k) / C(n, k)        (n samples, c of them correct, 1 <= k <= n)

computed as 1 - prod_{j=0}^{c-1} (1 - k / (n - j)) in log space (log1p, expm1), so it neither
overflows nor loses precision for n up to thousands; it is 1 exactly when n - c < k.
"""
from __future__ import annotations

import numpy as np

ROWS_PER_BLOCK = 4096


def _check_counts(n, c, k) -> None:
    for name, value in (("n", n), ("c", c), ("k", k)):
        if not np.issubdtype(value.dtype, np.integer):
            raise ValueError(f"pass_at_k: {name} must be integer counts, got dtype {value.dtype}")
    problems = [(c < 0) | (c > n), (k < 1) | (k > n)]
    expected = ["0 <= c <= n", "1 <= k <= n"]
    for bad, rule in zip(problems, expected):
        if np.any(bad):
            row = int(np.flatnonzero(bad.reshape(-1))[0])
            raise ValueError(f"pass_at_k: row {row} has n={n.reshape(-1)[row]}, "
                             f"c={c.reshape(-1)[row]}, "
                             f"k={k.reshape(-1)[row]}; expected {rule}")


def pass_at_k(n, c, k):
    """Unbiased pass@k; n, c, k: ints or integer arrays (broadcast together, e.g. one row per
    problem). Returns float64 of the broadcast shape (a Python float for scalar inputs);
    average over problems for a benchmark's pass@k."""
    n, c, k = (np.asarray(x) for x in (n, c, k))
    n, c, k = np.broadcast_arrays(n, c, k)
    _check_counts(n, c, k)
    flat_n, flat_c, flat_k = (x.reshape(-1).astype(np.float64) for x in (n, c, k))
    result = np.empty_like(flat_n)
    for start in range(0, flat_n.size, ROWS_PER_BLOCK):   # bounds the [rows, max_c] temporaries
        rows = slice(start, start + ROWS_PER_BLOCK)
        result[rows] = _pass_at_k_rows(flat_n[rows], flat_c[rows], flat_k[rows])
    result = result.reshape(n.shape)
    return float(result) if result.ndim == 0 else result


def _pass_at_k_rows(n, c, k):
    """pass@k of float64[rows] n, c, k (checked): 1 - prod_{j<c} (1 - k / (n - j))."""
    j = np.arange(int(c.max(initial=0)), dtype=np.float64)[None, :]   # [1, max_c]
    certain = n - c < k                                                 # [rows]
    active = (j < c[:, None]) & ~certain[:, None]                       # [rows, max_c]
    log_miss = np.sum(np.log1p(-k[:, None] / np.where(active, n[:, None] - j, np.inf)), axis=1)
    return np.where(certain, 1.0, 0.0 - np.expm1(log_miss))
