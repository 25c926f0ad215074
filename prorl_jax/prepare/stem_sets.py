"""STEM sources -> domain "stem" records {prompt, answer, subject}.

scp116k (training; EricLu/SCP-116K), both releases, told apart by their fields:
  current   {domain, problem, r1_response, r1_reasoning_content, extract_solution}: the answer is
            `extract_solution`, the short final answer a model extracted from the solution (as
            ProRL took its STEM answers from a model-extracted field). None/empty: skipped.
  original  {domain, problem, matched_solution, o1_solution, qwq_solution,
            is_o1_solution_same_with_matched_solution, is_qwq_solution_same_with_matched_solution}:
            textbook solutions are rarely boxed, so the answer is the first of: the last \\boxed{}
            of matched_solution; that of qwq_solution, then of o1_solution, when the flag says
            that model agreed with the matched solution. Neither: skipped.
  `domain` (fine-grained, e.g. "Physical Chemistry") becomes the record's `subject`.
gpqa (validation; GPQA-style multiple choice): {Question, Correct Answer, Incorrect Answer 1..3}
  (Idavidrein/gpqa CSV/hub columns), options shuffled deterministically per row (seeded by the
  row's Record ID or question); or {question, choices|options: [...], answer: index or letter}.
  The answer is the correct option's letter.
"""
from __future__ import annotations

import random
import re

from prorl_jax.data import DataError
from prorl_jax.prepare.rows import SkipRow, first_key, text_field
from prorl_jax.prepare.templates import CHOICE_LETTERS, choice_prompt, stem_prompt
from rewards.extract import last_boxed

CURRENT_FIELDS = ("extract_solution", "r1_response")
ORIGINAL_FIELDS = ("matched_solution",)
AGREEMENT_FLAGS = (("qwq_solution", "is_qwq_solution_same_with_matched_solution"),
                   ("o1_solution", "is_o1_solution_same_with_matched_solution"))


def clean_answer(text: str) -> str:
    """A short answer's text: the last \\boxed{} when it has one, math delimiters removed."""
    boxed = last_boxed(text)
    text = boxed if boxed is not None else text
    text = text.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if text.startswith(left) and text.endswith(right) and len(text) > len(left) + len(right):
            text = text[len(left):-len(right)].strip()
    return text


def _boxed(row: dict, name: str) -> str | None:
    value = row.get(name)
    if value is not None and not isinstance(value, str):
        raise DataError(f"field {name!r}: expected a string or null, got {value!r:.80}")
    boxed = last_boxed(value) if value else None
    return boxed.strip() if boxed and boxed.strip() else None


def _original_answer(row: dict, require_agreement: bool) -> str:
    agreed = [bool(row.get(flag)) for _, flag in AGREEMENT_FLAGS]
    if require_agreement and not any(agreed):
        raise SkipRow("no model solution agrees with the matched solution")
    answer = _boxed(row, "matched_solution")
    for (solution, _), ok in zip(AGREEMENT_FLAGS, agreed):
        if answer is None and ok:
            answer = _boxed(row, solution)
    if answer is None:
        raise SkipRow("no \\boxed{} answer in matched_solution or an agreeing model solution")
    return answer


def convert_scp116k(row: dict, *, require_agreement: bool = False,
                    max_answer_chars: int | None = None) -> dict:
    """An SCP-116K row of either release -> a stem record (see the module docstring)."""
    problem = text_field(row, "problem")
    if any(k in row for k in CURRENT_FIELDS):
        value = row.get("extract_solution")
        if value is None or (isinstance(value, str) and not value.strip()):
            raise SkipRow("extract_solution is empty")
        if not isinstance(value, str):
            raise DataError(f"field 'extract_solution': expected a string or null, "
                            f"got {value!r:.80}")
        answer = clean_answer(value)
        if not answer:
            raise SkipRow("extract_solution is empty")
    elif any(k in row for k in ORIGINAL_FIELDS):
        answer = _original_answer(row, require_agreement)
    else:
        raise DataError(f"fields: expected SCP-116K's 'extract_solution' (current release) or "
                        f"'matched_solution' (original release), got {sorted(row)}")
    if max_answer_chars is not None and len(answer) > max_answer_chars:
        raise SkipRow(f"answer longer than {max_answer_chars} characters")
    subject = row.get("domain")
    return {"domain": "stem", "prompt": stem_prompt(problem), "answer": answer,
            "subject": subject if isinstance(subject, str) else ""}


def _gpqa_options(row: dict, seed: int) -> tuple[str, list[str], int]:
    wrong_keys = sorted(k for k in row if re.fullmatch(r"incorrect answer \d+", k.lower()))
    correct_key = first_key(row, ("Correct Answer",))
    options = [row[correct_key]] + [row[k] for k in wrong_keys]
    for k, v in zip([correct_key] + wrong_keys, options):
        if not isinstance(v, str) or not v.strip():
            raise DataError(f"field {k!r}: expected a non-empty string, got {v!r:.80}")
    if len(wrong_keys) < 1 or len({o.strip() for o in options}) < len(options):
        raise SkipRow("options missing or repeated")
    question = text_field(row, first_key(row, ("Question",)))
    key = row.get(first_key(row, ("Record ID",)) or "") or question
    order = list(range(len(options)))
    random.Random(f"{seed}:{key}").shuffle(order)
    return question, [options[i] for i in order], order.index(0)


def _listed_options(row: dict) -> tuple[str, list[str], int]:
    q_key = first_key(row, ("question", "problem"))
    c_key = first_key(row, ("choices", "options"))
    a_key = first_key(row, ("answer", "label"))
    if q_key is None or a_key is None:
        raise DataError(f"fields: expected GPQA columns (Question, Correct Answer, Incorrect "
                        f"Answer N) or question/choices/answer, got {sorted(row)}")
    options = row[c_key]
    if not isinstance(options, list) or len(options) < 2 or len(options) > len(CHOICE_LETTERS) \
            or not all(isinstance(o, str) for o in options):
        raise DataError(f"field {c_key!r}: expected 2-{len(CHOICE_LETTERS)} option strings")
    answer = row[a_key]
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in CHOICE_LETTERS:
        index = CHOICE_LETTERS.index(answer.strip().upper())
    elif isinstance(answer, int) and not isinstance(answer, bool):
        index = answer
    else:
        raise DataError(f"field {a_key!r}: expected an option index or letter, got {answer!r:.40}")
    if not 0 <= index < len(options):
        raise DataError(f"field {a_key!r}: option {answer!r} out of range ({len(options)} options)")
    return text_field(row, q_key), options, index


def convert_gpqa(row: dict, *, seed: int = 0) -> dict:
    """A multiple-choice row -> a stem record whose answer is the correct option's letter."""
    if first_key(row, ("Correct Answer",)) is not None:
        question, options, index = _gpqa_options(row, seed)
    else:
        question, options, index = _listed_options(row)
    record = {"domain": "stem", "prompt": choice_prompt(question, options),
              "answer": CHOICE_LETTERS[index]}
    subject = row.get(first_key(row, ("Subdomain", "subject")) or "")
    if isinstance(subject, str) and subject:
        record["subject"] = subject
    return record
