"""STEM domain (binary): multiple-choice letters, numbers with a relative tolerance, else math.

The predicted answer is the last `\\boxed{}` of the answer region; without one, a final
"Answer: X" line is accepted (STEM data is often multiple choice answered in prose). Then, for a
gold answer g:
- g is a single letter A-J (multiple choice): R = 1 iff the prediction is that letter, alone or
  as "(B)", "B)", "B.", "B: text", "\\text{B}" (case-sensitive upper letter).
- g is a plain number: R = 1 iff |pred - g| <= REL_TOL * max(|g|, ABS_FLOOR) for a plain-number
  prediction (units and thousands separators are not stripped here: math-verify handles them).
- otherwise (or when the number test fails): math-verify equivalence, as in domain "math"
  (with its guards: over-long, over-nested or hedged predictions score 0, see
  `rewards.math_grader.prepare_prediction`).
"""
from __future__ import annotations

import re

from rewards.extract import last_boxed
from rewards.math_grader import accepted_answers, equivalent, prepare_prediction
from rewards.registry import register

REL_TOL = 1e-2  # relative tolerance for numeric answers (1%)
ABS_FLOOR = 1e-8  # tolerance floor for gold = 0

_LETTER_RE = re.compile(r"^[A-J]$")
_PRED_LETTER_RE = re.compile(r"^\(?\s*(?:\\text\{)?\s*([A-J])\s*\}?\s*\)?\s*(?:[.:)].*)?$", re.DOTALL)
_NUMBER_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_ANSWER_LINE_RE = re.compile(r"(?:final answer|answer)\s*(?:is)?\s*[:：]?\s*(.+)$", re.IGNORECASE)


def predicted_answer(answer: str) -> str | None:
    """The last `\\boxed{}` content, else the text after a last "Answer:" line; None if neither."""
    boxed = last_boxed(answer)
    if boxed is not None:
        return boxed.strip()
    lines = [ln.strip() for ln in answer.strip().splitlines() if ln.strip()]
    for line in reversed(lines[-3:]):
        m = _ANSWER_LINE_RE.search(line.replace("*", ""))
        if m:
            return m.group(1).strip().rstrip(".").strip("$ ")
    return None


def choice_letter(pred: str) -> str | None:
    """"B", "(B)", "B)", "B. text", "\\text{B}" -> "B"; None if `pred` is not a choice."""
    m = _PRED_LETTER_RE.match(pred.strip())
    return m.group(1) if m else None


def numbers_close(gold: float, pred: float, rel_tol: float = REL_TOL) -> bool:
    """|pred - gold| <= rel_tol * max(|gold|, ABS_FLOOR)."""
    return abs(pred - gold) <= rel_tol * max(abs(gold), ABS_FLOOR)


def stem_match(gold: str, pred: str) -> bool:
    """Binary match of one gold answer against one predicted answer (see module docstring)."""
    if _LETTER_RE.match(gold):
        return choice_letter(pred) == gold
    if _NUMBER_RE.match(gold) and _NUMBER_RE.match(pred.replace(" ", "")):
        if numbers_close(float(gold), float(pred.replace(" ", ""))):
            return True
    if pred == gold:
        return True
    pred = prepare_prediction(pred, [gold])
    return pred is not None and equivalent(gold, pred)


def stem_reward(golds: list[str], answer: str) -> float:
    """1.0 if the predicted answer of `answer` matches any gold answer, else 0.0."""
    pred = predicted_answer(answer)
    if not pred:
        return 0.0
    return 1.0 if any(stem_match(g, pred) for g in golds) else 0.0


def _validate(record: dict) -> None:
    accepted_answers(record)


@register("stem", required_fields=("answer",), validate=_validate)
def score_stem(record: dict, answer: str) -> float:
    """Registry entry for domain "stem": record["answer"] is a string or list of strings."""
    return stem_reward(accepted_answers(record), answer)
