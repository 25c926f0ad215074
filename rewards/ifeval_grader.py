"""Instruction-following domain (continuous): fraction of IFEval instructions followed (strict).

    R = (1/m) * sum_j check_j(answer, **kwargs_j),  m = len(instruction_id_list)

Record: `instruction_id_list` ([m] IFEval ids, see `rewards.ifeval_checks.INSTRUCTION_KWARGS`)
and `kwargs` ([m] dicts; keys whose value is None are dropped, as in the published IFEval data).
An unknown id, an argument name the instruction does not take, or a missing argument is a record
error; a check that raises counts as not followed. The answer region is the text after the
reasoning (`</think>`), with any leftover `<think>...</think>` span removed. As in the official
strict evaluation, an empty (or whitespace-only) answer follows no instruction, so R = 0; an
answer longer than MAX_ANSWER_CHARS also follows none (R = 0, so no check ever reads more).
"""
from __future__ import annotations

from rewards.extract import strip_think
from rewards.ifeval_checks import CHECKS, INSTRUCTION_KWARGS
from rewards.registry import register

MAX_ANSWER_CHARS = 16 * 1024  # ~2,500 words (IFEval asks for 1,200 at most); Punkt reads
# adversarial text at ~35 us/char, so this keeps an item well under 1 s


def _args(kw: dict | None) -> dict:
    return {k: v for k, v in (kw or {}).items() if v is not None}


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
        given, wanted = set(_args(kw)), set(INSTRUCTION_KWARGS[iid])
        if given != wanted:
            raise ValueError(
                f"field 'kwargs[{j}]' ({iid}): expected arguments {sorted(wanted)}, got "
                f"{sorted(given)}")


def instructions_followed(answer: str, ids: list[str], kwargs: list[dict | None]) -> list[bool]:
    """[m] per-instruction results; an unknown id or a raising check gives False, and so does
    every instruction for an empty/whitespace answer or one over MAX_ANSWER_CHARS."""
    if not answer.strip() or len(answer) > MAX_ANSWER_CHARS:
        return [False] * len(ids)
    results = []
    for iid, kw in zip(ids, kwargs):
        check = CHECKS.get(iid)
        try:
            results.append(bool(check(answer, **_args(kw))) if check else False)
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
