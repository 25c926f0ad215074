"""Public scoring entry points: `score` (one item, in this process) and `score_batch` (pool).

    score(record, response) -> float in [0, 1]
    score_batch(records, responses) -> [n] floats (and BatchDetails with return_details=True)

Both validate the record first (RecordError naming the field) and grade the answer region of the
response (`rewards.extract.answer_region`, setting `think_mode`). `score_batch` uses a module-level
`RewardPool` created on first use and reused across calls (closed at exit); a trainer may instead
keep its own pool and call `pool.score_batch`.
"""
from __future__ import annotations

import atexit

from rewards.extract import answer_region
from rewards.pool import RewardPool, guarded_score
from rewards.registry import scoring_domain

_DEFAULT_POOL: RewardPool | None = None


def score(record: dict, response: str, *, think_mode: str = "require") -> float:
    """Reward in [0, 1] of one response, computed in the calling process.

    No per-item time limit is imposed here beyond the checkers' own (math-verify's alarms, the
    code sandbox's timeouts); use `score_batch` for isolation from hanging checkers.
    """
    domain = scoring_domain(record)
    if not isinstance(response, str):
        raise TypeError(f"response: expected str, got {type(response).__name__}")
    answer = answer_region(response, think_mode)
    if answer is None:
        return 0.0
    return guarded_score(domain.fn, record, answer)[0]


def default_pool(num_workers: int | None = None) -> RewardPool:
    """The shared pool (re-created when a different `num_workers` is asked for)."""
    global _DEFAULT_POOL
    if _DEFAULT_POOL is not None and num_workers and _DEFAULT_POOL.num_workers != num_workers:
        _DEFAULT_POOL.close()
        _DEFAULT_POOL = None
    if _DEFAULT_POOL is None:
        _DEFAULT_POOL = RewardPool(num_workers)
    return _DEFAULT_POOL


def close_default_pool() -> None:
    """Stop the shared pool's workers (also done at interpreter exit)."""
    global _DEFAULT_POOL
    if _DEFAULT_POOL is not None:
        _DEFAULT_POOL.close()
        _DEFAULT_POOL = None


atexit.register(close_default_pool)


def score_batch(records: list, responses: list, *, num_workers: int | None = None,
                think_mode: str = "require", timeout_s: float | None = None,
                return_details: bool = False, pool: RewardPool | None = None):
    """Rewards [n] for paired records/responses, scored in parallel worker processes.

    Args:
      num_workers: size of the shared pool (default: CPU count, at most 16).
      think_mode: "require" (no `</think>` -> unanswered, reward 0) or "optional".
      timeout_s: per-item limit in seconds (None: 10 s); never below a domain's own budget
        (code: the sandbox's per-response budget, which scales with the number of tests).
      return_details: also return BatchDetails (per-item status, crash/timeout counts).
      pool: a RewardPool to use instead of the shared one.
    """
    pool = pool if pool is not None else default_pool(num_workers)
    return pool.score_batch(records, responses, think_mode=think_mode, timeout_s=timeout_s,
                            return_details=return_details)
