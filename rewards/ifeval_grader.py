"""Instruction-following domain (continuous): fraction of IFEval instructions followed (strict).

    R = (1/m) * sum_j check_j(answer, **kwargs_j),  m = len(instruction_id_list)

Record: `instruction_id_list` ([m] IFEval ids, see `rewards.ifeval_checks.CHECKS`) and `kwargs`
([m] dicts; keys whose value is None are dropped, as in the published IFEval data). An unknown
id is a record error; a check that raises counts as not followed. The answer region is the text
after the reasoning (`</think>`), with any leftover `<think>...</think>` span removed.
"""
from __future__ import annotations

from rewards.extract import strip_think
from rewards.ifeval_checks import CHECKS
from rewards.registry import register


def validate_ifeval_record(record: dict) -> None:
    """ValueError naming the field when the instruction list or kwargs are malformed."""
    ids, kwargs = record["instruction_id_list"], record["kwargs"]
    if not isinstance(ids, list) or not ids:
        raise ValueError("field 'instruction_id_list': expected a non-empty list of ids")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise ValueError(
            f"field 'kwargs': expected a list of {len(ids)} dicts (one per instruction)"
        )
    for j, (iid, kw) in enumerate(zip(ids, kwargs)):
        if iid not in CHECKS:
            raise ValueError(f"field 'instruction_id_list[{j}]': unknown instruction id {iid!r}")
        if kw is not None and not isinstance(kw, dict):
            raise ValueError(f"field 'kwargs[{j}]': expected a dict, got {type(kw).__name__}")


def instructions_followed(answer: str, ids: list[str], kwargs: list[dict | None]) -> list[bool]:
    """[m] per-instruction results; an unknown id or a raising check gives False."""
    results = []
    for iid, kw in zip(ids, kwargs):
        check = CHECKS.get(iid)
        args = {k: v for k, v in (kw or {}).items() if v is not None}
        try:
            results.append(bool(check(answer, **args)) if check else False)
        except Exception:
            results.append(False)
    return results


def ifeval_reward(answer: str, ids: list[str], kwargs: list[dict | None]) -> float:
    """Fraction of instructions followed by `answer`."""
    followed = instructions_followed(strip_think(answer), ids, kwargs)
    return sum(followed) / len(followed) if followed else 0.0


@register("ifeval", required_fields=("instruction_id_list", "kwargs"),
          validate=validate_ifeval_record)
def score_ifeval(record: dict, answer: str) -> float:
    """Registry entry for domain "ifeval"."""
    return ifeval_reward(answer, record["instruction_id_list"], record["kwargs"])
