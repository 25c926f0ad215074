"""Math sources -> domain "math" records {prompt, answer}.

deepscaler (training; agentica-org/DeepScaleR-Preview-Dataset, one JSON list `deepscaler.json`
  of ~40.3k {problem, answer, solution}): a few rows have an empty answer: skipped and counted.
aime (validation; AIME-style answer lists): {problem|question, answer} with any capitalisation
  (AI-MO/aimo-validation-aime: problem/answer; Maxwell-Jia/AIME_2024: Problem/Answer (int);
  opencompass/AIME2025: question/answer). An empty answer is skipped and counted.
"""
from __future__ import annotations

from prorl_jax.data import DataError
from prorl_jax.prepare.rows import SkipRow, first_key, text_field
from prorl_jax.prepare.templates import math_prompt


def answer_text(value, name: str) -> str:
    """An answer field as a stripped string; SkipRow when empty, DataError when not a scalar."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise SkipRow(f"empty {name}")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"field {name!r}: expected a string or a number, got {value!r:.80}")
    return str(value).strip()


def convert_deepscaler(row: dict) -> dict:
    """DeepScaleR {problem, answer, solution} -> a math record."""
    problem = text_field(row, "problem")
    if "answer" not in row:
        raise DataError("field 'answer': missing")
    return {"domain": "math", "prompt": math_prompt(problem),
            "answer": answer_text(row["answer"], "answer")}


def convert_aime(row: dict) -> dict:
    """An AIME-style row {problem|question, answer} (any capitalisation) -> a math record."""
    p_key = first_key(row, ("problem", "question"))
    a_key = first_key(row, ("answer",))
    if p_key is None or a_key is None:
        raise DataError(f"fields: expected 'problem' (or 'question') and 'answer', got "
                        f"{sorted(row)}")
    record = {"domain": "math", "prompt": math_prompt(text_field(row, p_key)),
              "answer": answer_text(row[a_key], a_key)}
    id_key = first_key(row, ("id", "ID", "problem_id"))
    if id_key is not None and row[id_key] is not None:
        record["id"] = f"aime-{row[id_key]}"
    return record
