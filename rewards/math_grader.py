"""Math domain (binary): DeepScaleR's rule with math-verify.

    R = 1  if verify(parse(gold), parse("$" + last_boxed(answer) + "$")) for any accepted gold
           (shortcuts: equal strings, or equal integers when both are plain integers)
    R = 0  otherwise (no `\\boxed{}` in the answer region, unparsable, not equivalent)

Before comparing (`prepare_prediction`, `normalise_gold`):
- a trailing period inside the box is dropped (`\\boxed{2/3.}` reads as `2/3`);
- a box over MAX_BOXED_CHARS characters, nested deeper than MAX_NESTING ({[( levels), or
  holding an integer power, factorial or binomial of literals with more than MAX_LITERAL_DIGITS
  digits (`9^{9^{9}}`, `1000000!`: sympy would compute it until math-verify's alarm) scores 0
  without calling math-verify - unless it is literally a gold answer;
- a hedged box scores 0: one whose words (inside `\\text{}` or bare) include a HEDGE_WORDS
  word such as "or"/"maybe" (math-verify would otherwise read `\\text{4 or maybe 5}` as 4),
  unless the gold itself uses that word;
- a decimal-comma gold (`1,22`, `0,125`, `-3,5`: digits, one comma, then not exactly three
  digits, or a leading 0) means the decimal number 1.22; a prediction in the same notation is
  read the same way. (`1,000` stays one thousand, as math-verify reads it.)

math-verify is called gold first (it is not symmetric). Its own timeouts use `signal.alarm`, which
only works in a process's main thread: `score_batch` runs verifiers in the main thread of worker
processes; when called from another thread the timeouts are switched off (the caller must then
bound the time itself, as `score_batch` does by killing the worker).
"""
from __future__ import annotations

import functools
import math
import re
import threading
import time

from rewards.extract import closing_braces, last_boxed
from rewards.registry import register

PARSE_TIMEOUT_S = 3  # math-verify's per-call limits (integer seconds, signal.alarm)
VERIFY_TIMEOUT_S = 3
MAX_BOXED_CHARS = 512  # longer boxed answers score 0 unseen by math-verify
MAX_NESTING = 8  # deeper {[( nesting scores 0 (latex2sympy parses nested brackets slowly)
MAX_LITERAL_DIGITS = 10_000  # larger literal powers/factorials/binomials score 0 (see above)
HEDGE_WORDS = ("or", "maybe", "perhaps", "possibly", "probably", "either", "unsure", "guess")
_HEDGE_RE = re.compile(r"(?<![\\a-zA-Z])(" + "|".join(HEDGE_WORDS) + r")(?![a-zA-Z])",
                       re.IGNORECASE)
_POWER_BASE_RE = re.compile(r"(?<![\d.])(\d+)\s*\^\s*")
_LITERAL_POWER_RE = re.compile(r"(\d+)\s*\^\s*(?:\{(.*)\}|(\d))", re.DOTALL)
_FACTORIAL_RE = re.compile(r"(?<![\d.])(\d{4,})\s*!")
_BINOMIAL_RE = re.compile(r"\\[dt]?binom\s*\{\s*(\d+)\s*\}\s*\{\s*(\d+)\s*\}")
_DECIMAL_COMMA_RE = re.compile(r"[-+]?(?:0,\d+|\d+,(?:\d{1,2}|\d{4,}))")


def accepted_answers(record: dict, field: str = "answer") -> list[str]:
    """The record's accepted answer strings; ValueError naming the field if malformed."""
    gold = record[field]
    golds = [gold] if isinstance(gold, (str, int, float)) else gold
    if not isinstance(golds, (list, tuple)) or not golds:
        raise ValueError(f"field {field!r}: expected a string or a non-empty list of strings")
    out = []
    for g in golds:
        if not isinstance(g, (str, int, float)) or isinstance(g, bool) or not str(g).strip():
            raise ValueError(f"field {field!r}: expected non-empty strings, got {g!r}")
        out.append(str(g).strip())
    return out


def _validate(record: dict) -> None:
    accepted_answers(record)


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout_s: int | None):
    import math_verify

    parsed = math_verify.parse(_as_latex(gold), parsing_timeout=timeout_s)
    if not parsed:  # plain text gold (e.g. "x^2 + 1" without math delimiters)
        parsed = math_verify.parse(gold, parsing_timeout=timeout_s)
    return parsed


def _as_latex(text: str) -> str:
    """Wrap in `$...$` unless already delimited, so math-verify reads it as LaTeX."""
    t = text.strip()
    return t if t.startswith("$") or t.startswith("\\(") or t.startswith("\\[") else f"${t}$"


def _timeouts() -> tuple[int | None, int | None]:
    """math-verify's (parse, verify) limits: off outside the main thread (signal.alarm)."""
    if threading.current_thread() is threading.main_thread():
        return PARSE_TIMEOUT_S, VERIFY_TIMEOUT_S
    return None, None


def parse_prediction(predicted: str):
    """math-verify's parse of a predicted LaTeX expression ([] if unparsable)."""
    import math_verify

    return math_verify.parse(_as_latex(predicted), parsing_timeout=_timeouts()[0])


def equivalent(gold: str, predicted: str) -> bool:
    """True iff math-verify finds `predicted` (a LaTeX expression) equivalent to `gold`."""
    import math_verify

    parse_t, verify_t = _timeouts()
    gold_parsed = _parse_gold(gold, parse_t)
    pred_parsed = parse_prediction(predicted)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=verify_t))


_INT_RE = re.compile(r"^[-+]?\d+$")


_MATCH_CACHE: dict[tuple[str, str], bool] = {}
MATCH_CACHE_SIZE = 1 << 16


def matches_gold(gold: str, boxed: str) -> bool:
    """Whether `boxed` answers `gold`: equal strings, equal integers, else math-verify.

    Memoised per process (in a GRPO group many responses give the same final answer), except
    for calls slow enough that math-verify may have timed out (its timeouts return False).
    """
    if boxed == gold:
        return True
    if _INT_RE.match(gold) and _INT_RE.match(boxed):
        return int(gold) == int(boxed)
    key = (gold, boxed)
    if key in _MATCH_CACHE:
        return _MATCH_CACHE[key]
    start = time.monotonic()
    result = equivalent(gold, boxed)
    if time.monotonic() - start < 0.5 * min(PARSE_TIMEOUT_S, VERIFY_TIMEOUT_S):
        if len(_MATCH_CACHE) >= MATCH_CACHE_SIZE:
            _MATCH_CACHE.clear()
        _MATCH_CACHE[key] = result
    return result


def nesting_depth(text: str) -> int:
    """Deepest nesting of {, [ and ( brackets in `text` (closing brackets of any kind pop)."""
    depth = deepest = 0
    for ch in text:
        if ch in "{[(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "}])" and depth:
            depth -= 1
    return deepest


def _log10_literal(expr: str) -> float | None:
    """log10 of `expr` when it is an integer literal or a tower `a^{b^{...}}` of them, else None."""
    expr = expr.strip()
    if expr.isdigit():  # at most MAX_BOXED_CHARS digits: log10 of the int is exact enough
        return math.log10(int(expr)) if int(expr) > 0 else 0.0
    m = _LITERAL_POWER_RE.fullmatch(expr)
    if m is None:
        return None
    exponent = _log10_literal(m.group(2) if m.group(2) is not None else m.group(3))
    if exponent is None:
        return None
    if exponent > 7:  # an exponent over 10^7 is too large for any base > 1
        return math.inf if int(m.group(1)) > 1 else 0.0
    return math.log10(max(int(m.group(1)), 1)) * 10 ** exponent


def literal_too_large(text: str) -> bool:
    """True when `text` holds an integer power, factorial or binomial of literals with over
    MAX_LITERAL_DIGITS digits (one pass over its "^", "!" and binomials)."""
    closing = closing_braces(text)
    for m in _POWER_BASE_RE.finditer(text):
        i = m.end()
        if i < len(text) and text[i] == "{" and i in closing:
            digits = _log10_literal(text[m.start():closing[i] + 1])
        else:
            digits = _log10_literal(text[m.start():i + 1])
        if digits is not None and digits > MAX_LITERAL_DIGITS:
            return True
    for m in _FACTORIAL_RE.finditer(text):
        if math.lgamma(int(m.group(1)) + 1) / math.log(10) > MAX_LITERAL_DIGITS:
            return True
    for m in _BINOMIAL_RE.finditer(text):
        n, k = int(m.group(1)), int(m.group(2))
        if 0 <= k <= n and (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) \
                / math.log(10) > MAX_LITERAL_DIGITS:
            return True
    return False


def is_decimal_comma(text: str) -> bool:
    """True for `1,22`-style decimal numbers (see module docstring); False for `1,000`."""
    return _DECIMAL_COMMA_RE.fullmatch(text) is not None


def normalise_gold(gold: str) -> str:
    """The gold as math-verify should read it: a decimal comma becomes a decimal point."""
    return gold.replace(",", ".") if is_decimal_comma(gold) else gold


def prepare_prediction(boxed: str, golds: list[str]) -> str | None:
    """The boxed text to compare, or None when it must score 0 (see module docstring)."""
    boxed = boxed.strip()
    if boxed.endswith("."):
        boxed = boxed[:-1].rstrip()
    if not boxed or len(boxed) > MAX_BOXED_CHARS or nesting_depth(boxed) > MAX_NESTING:
        return None
    if literal_too_large(boxed):
        return None
    hedges = {w.lower() for w in _HEDGE_RE.findall(boxed)}
    if hedges and not all(_HEDGE_RE.search(g) for g in golds):
        return None
    return boxed


def math_reward(golds: list[str], answer: str) -> float:
    """1.0 if the last `\\boxed{}` of `answer` matches any gold (see `matches_gold`)."""
    boxed = last_boxed(answer)
    if boxed is None:
        return 0.0
    if boxed.strip() in golds:
        return 1.0
    pred = prepare_prediction(boxed, golds)
    if pred is None:
        return 0.0
    for gold in golds:
        guess = normalise_gold(pred) if is_decimal_comma(gold) else pred
        if matches_gold(normalise_gold(gold), guess):
            return 1.0
    return 0.0


@register("math", required_fields=("answer",), validate=_validate)
def score_math(record: dict, answer: str) -> float:
    """Registry entry for domain "math": record["answer"] is a string or list of strings."""
    return math_reward(accepted_answers(record), answer)
