"""The project's own strict scoring of reasoning-gym tasks: no reward for non-answers.

reasoning-gym's scorers give partial credit that a policy can collect without solving: a
"format" reward for any parsable text (countdown 0.01 for an empty answer, graph_color 0.01 and
boxnet 0.05 for any JSON), partial matches (sudoku 0.8 with a corrupted cell, 0.78 for a padded
oracle), the default scorer's len(oracle)/len(answer) for padding, and some full credits for
hedged answers (gsm_symbolic reads the first number anywhere in the text). Here every task is
scored binary, R in {0, 1}, by one of these modes (`scoring_mode(task)` says which):

- "exact": tasks with reasoning-gym's default scorer: the stripped answer equals the oracle.
- "full_credit": tasks with their own scorer whose full credit (1.0) is a real verification
  (an exact match, or a check of the answer's validity: a coloring, an expression, a plan):
  R = 1 iff reasoning-gym gives 1.0; all partial credit is dropped.
- "own": OWN_SCORERS below, where reasoning-gym's full credit is itself gameable or broken;
  each entry gives its reason.
Tasks that cannot be scored strictly are in `rewards.logic_grader.EXCLUDED_TASKS` (refused).

Some reasoning-gym scorers evaluate the answer as Python: `eval(answer)` (binary_matrix,
n_queens, number_sorting, spiral_matrix, string_insertion) or `sympy.parse_expr(answer)`, which
is `eval` too (countdown, puzzle24, simple_integration, intermediate_integration,
polynomial_multiplication): `__import__('os').getpid()` runs in the reward worker. Their answers
go through EVAL_GUARDS first: plain-eval tasks accept only list-literal characters (no
parentheses, so nothing can be called, and no operators, so nothing can be large); sympy tasks
accept only arithmetic on numbers, single-letter symbols and a few named functions, at most
EXPR_MAX_CHARS long, with no exponent of an exponent (no `9**9**9**9`). A refused answer is 0.
"""
from __future__ import annotations

import re
from typing import Callable

_NUMBER_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")
_FRACTION_RE = re.compile(r"\\d?frac\s*\{\s*\d+\s*\}\s*\{\s*\d+\s*\}|\d+\s*/\s*\d+", re.IGNORECASE)
EXPR_MAX_CHARS = 512
_LITERAL_RE = re.compile(r"[\w\s\[\],'\".\-]*")
_EXPR_RE = re.compile(r"[\w\s+\-*/^().,]*")
_IDENT_RE = re.compile(r"[A-Za-z_]\w*")
_NESTED_POWER_RE = re.compile(r"(\*\*|\^)\s*[\w.(]+\s*(\*\*|\^)")
SYMPY_NAMES = frozenset({"sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan",
                         "sinh", "cosh", "tanh", "exp", "log", "ln", "sqrt", "pi", "oo", "Abs"})
_KK_CLAUSE_RE = re.compile(r"(\w+) is an? (\w+)")
_KK_SPLIT_RE = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+")


def exact_match(answer: str, entry: dict) -> float:
    """1 iff the stripped answer equals the stripped oracle."""
    return 1.0 if answer.strip() == str(entry["answer"]).strip() else 0.0


def number_match(answer: str, entry: dict) -> float:
    """1 iff the whole answer is one number equal to the oracle's (gsm_symbolic)."""
    text = answer.strip()
    if not _NUMBER_RE.fullmatch(text):
        return 0.0
    return 1.0 if float(text) == float(str(entry["answer"]).strip()) else 0.0


def case_insensitive_match(answer: str, entry: dict) -> float:
    """1 iff answer and oracle are equal, stripped and lower-cased (letter_jumble)."""
    return 1.0 if answer.strip().lower() == str(entry["answer"]).strip().lower() else 0.0


def grid_match(answer: str, entry: dict) -> float:
    """1 iff the answer's rows of whitespace-separated cells equal the oracle's (arc tasks)."""
    rows = lambda text: [ln.split() for ln in text.strip().splitlines() if ln.strip()]
    return 1.0 if rows(answer) == rows(str(entry["answer"])) else 0.0


def _kk_assignment(text: str) -> dict[str, str] | None:
    """{name: role} of "A is a knight, and B is a knave." (every clause must be one claim)."""
    out = {}
    for clause in _KK_SPLIT_RE.split(text.strip().rstrip(".").strip()):
        m = _KK_CLAUSE_RE.fullmatch(clause.strip())
        if m is None or m.group(1) in out:
            return None
        out[m.group(1)] = m.group(2).lower()
    return out


def knights_knaves_match(answer: str, entry: dict) -> float:
    """1 iff the answer states exactly the oracle's role for every person, nothing else."""
    got, want = _kk_assignment(answer), _kk_assignment(str(entry["answer"]))
    return 1.0 if got is not None and got == want else 0.0


def moves_only(scorer: Callable[[str, dict], float]) -> Callable[[str, dict], float]:
    """Full credit of `scorer` for an answer made of move letters only (sokoban: U, D, L, R)."""
    def strict(answer: str, entry: dict) -> float:
        text = answer.strip()
        return 1.0 if re.fullmatch(r"[UDLR]+", text) and scorer(text, entry) >= 1.0 else 0.0
    return strict


def literal_only(answer: str) -> bool:
    """Safe for `eval`: list-literal characters only (no call, no operator but unary minus)."""
    return _LITERAL_RE.fullmatch(answer) is not None and "__" not in answer


def sympy_safe(answer: str) -> bool:
    """Safe for `sympy.parse_expr`: short arithmetic on numbers, one-letter symbols, SYMPY_NAMES,
    and no exponent of an exponent."""
    if len(answer) > EXPR_MAX_CHARS or _EXPR_RE.fullmatch(answer) is None:
        return False
    if _NESTED_POWER_RE.search(answer) or "_" in answer:
        return False
    return all(len(name) == 1 or name in SYMPY_NAMES for name in _IDENT_RE.findall(answer))


EVAL_GUARDS: dict[str, Callable[[str], bool]] = {
    **{t: literal_only for t in ("binary_matrix", "n_queens", "number_sorting", "spiral_matrix",
                                 "string_insertion")},
    **{t: sympy_safe for t in ("countdown", "puzzle24", "simple_integration",
                               "intermediate_integration", "polynomial_multiplication")},
}


def single_fraction(answer: str) -> bool:
    """The whole answer is one fraction, `a/b` or `\\frac{a}{b}` (optionally in $...$)."""
    return _FRACTION_RE.fullmatch(answer.strip().strip("$").strip()) is not None


def relative_close(rel_tol: float) -> Callable[[str, dict], float]:
    """1 iff the answer (a number or fraction) is within `rel_tol` of the oracle, relatively."""
    from fractions import Fraction

    def strict(answer: str, entry: dict) -> float:
        try:
            got = float(Fraction(answer.strip().replace(",", "")))
            want = float(Fraction(str(entry["answer"]).strip().replace(",", "")))
        except (ValueError, ZeroDivisionError):
            return 0.0
        return 1.0 if abs(got - want) <= rel_tol * abs(want) else 0.0
    return strict


def full_credit(scorer: Callable[[str, dict], float]) -> Callable[[str, dict], float]:
    """R = 1 iff `scorer` (reasoning-gym's) gives full credit (1.0)."""
    def strict(answer: str, entry: dict) -> float:
        return 1.0 if float(scorer(answer, entry)) >= 1.0 else 0.0
    return strict


def _arithmetic_value(node, literals: list[int]):
    """Exact value (a Fraction) of an ast node of + - * / on integer literals, collected in
    `literals`; ValueError for anything else (names, calls, powers, floats)."""
    import ast
    from fractions import Fraction

    if isinstance(node, ast.Constant) and type(node.value) is int:
        literals.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _arithmetic_value(node.operand, literals)
        return value if isinstance(node.op, ast.UAdd) else -value
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        left = _arithmetic_value(node.left, literals)
        right = _arithmetic_value(node.right, literals)
        if isinstance(node.op, ast.Div):
            if right == 0:
                raise ValueError("division by zero")
            return left / right
        return {ast.Add: left + right, ast.Sub: left - right,
                ast.Mult: left * right}[type(node.op)]
    raise ValueError(f"not + - * / on integers: {type(node).__name__}")


def make_target_match(answer: str, entry: dict, target: int = 24) -> float:
    """puzzle24: 1 iff the answer is an expression of + - * / and parentheses that uses exactly
    the puzzle's numbers (entry["metadata"]["numbers"], each once) and equals `target` exactly
    (rational arithmetic). Parsed with `ast`, never evaluated as Python."""
    import ast

    text = answer.strip()
    if len(text) > EXPR_MAX_CHARS or not re.fullmatch(r"[\d\s+\-*/()]+", text):
        return 0.0
    literals: list[int] = []
    try:
        value = _arithmetic_value(ast.parse(text, mode="eval").body, literals)
    except (ValueError, SyntaxError, RecursionError):
        return 0.0
    numbers = sorted(int(x) for x in entry["metadata"]["numbers"])
    return 1.0 if sorted(literals) == numbers and value == target else 0.0


Scorer = Callable[[str, dict], float]
_own = lambda scorer: (lambda rg_scorer: scorer)  # noqa: E731  (ignores reasoning-gym's scorer)

# task -> (make(reasoning-gym's scorer) -> the strict scorer, reason). reasoning-gym 0.1.25.
OWN_SCORERS: dict[str, tuple[Callable[[Scorer], Scorer], str]] = {
    "gsm_symbolic": (_own(number_match), "reasoning-gym takes the first number anywhere in the "
                                         "answer: 'maybe 12 or 13' earns full credit when 12 is "
                                         "right"),
    "letter_jumble": (_own(case_insensitive_match), "its word-by-word partial credit reaches 1.0 "
                                                    "for the oracle padded with more words"),
    "knights_knaves": (_own(knights_knaves_match), "full credit for an answer that also names "
                                                   "wrong roles ('maybe ... or ...')"),
    "sokoban": (moves_only, "full credit for a hedged answer: extra text around the moves"),
    "fraction_simplification": (lambda rg: gated(single_fraction, full_credit(rg)),
                                "it reads the first fraction of the answer: the oracle padded "
                                "with guesses earns 1.0"),
    "coin_flip": (_own(relative_close(1e-3)), "its absolute tolerance of 1e-4 on a probability "
                                              "gives '0' full credit on most entries (small "
                                              "probabilities)"),
    "arc_agi": (_own(grid_match), "its scorer compares with tuples that do not survive JSON (the "
                                  "oracle itself scores 0.05 after a round trip)"),
    "rearc": (_own(grid_match), "as arc_agi"),
    "puzzle24": (_own(make_target_match), "its scorer checks only that the expression equals "
                                          "24, not that it uses the puzzle's numbers: any '4*6' "
                                          "earns full credit on every problem"),
}


def strict_scorer(task: str, rg_scorer: Scorer, has_default_scorer: bool) -> tuple[str, Scorer]:
    """(mode, scorer) for `task` (see module docstring)."""
    if task in OWN_SCORERS:
        return "own", OWN_SCORERS[task][0](rg_scorer)
    if has_default_scorer:
        return "exact", exact_match
    scorer = full_credit(rg_scorer)
    return "full_credit", gated(EVAL_GUARDS[task], scorer) if task in EVAL_GUARDS else scorer


def gated(guard: Callable[[str], bool],
          scorer: Callable[[str, dict], float]) -> Callable[[str, dict], float]:
    """`scorer`, for answers that pass `guard` (others score 0 and never reach it)."""
    def strict(answer: str, entry: dict) -> float:
        return scorer(answer, entry) if guard(answer) else 0.0
    return strict
