"""Verifiable rewards for the five ProRL domains (math, stem, code, logic, ifeval). No JAX.

    rewards.score(record, response, *, think_mode="require") -> float in [0, 1]
    rewards.score_batch(records, responses, *, num_workers=None, think_mode="require",
                        timeout_s=None, return_details=False, pool=None) -> list[float]
    rewards.register(domain, *, required_fields=(...))  # decorator: fn(record, answer) -> float

A record is a dict with `domain` and that domain's fields (see each `*_grader` module).
"""
from rewards.registry import RecordError, check_available, register, registered_domains  # noqa: F401  (first: toy uses it)
from rewards.sandbox import SandboxLimits, SandboxUnavailableError  # noqa: F401
from rewards import code_grader, ifeval_grader, logic_grader, math_grader, stem_grader  # noqa: F401,E402
from rewards.api import close_default_pool, default_pool, score, score_batch  # noqa: F401,E402
from rewards.logic_grader import logic_records  # noqa: F401,E402
from rewards.pool import BatchDetails, RewardPool  # noqa: F401,E402

try:
    import rewards.toy  # noqa: F401,E402  (the CPU demo's domain, registered through `register`)
except ModuleNotFoundError as _err:
    if _err.name != "rewards.toy":
        raise
