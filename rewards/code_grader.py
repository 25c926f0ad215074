"""Code domain (continuous): fraction of test cases passed by the last fenced python block.

    R = (# tests i with status "ok" and output_i matching expected_i) / k,
    k = min(len(tests), record["max_tests"]) (first k tests; all when max_tests is absent)
Tests not started within the sandbox's per-response budget (SandboxLimits.total_timeout_s)
count as failed, so a program that hangs on every test costs ~that budget, not k timeouts.

Record: `tests = {"inputs": [...], "outputs": [...], "fn_name"?: str}`.
- stdin/stdout tests (no fn_name): inputs[i] is stdin text, outputs[i] the expected stdout;
  outputs match when, line by line with trailing whitespace and trailing blank lines removed, they
  are equal, or when their whitespace-separated tokens are pairwise equal (`tokens_equal`):
  identical strings; an integer expected token (`-?\d+`) only by an integer token of the same
  value (exact, however large); a float expected token (with a `.` or an exponent) by any number
  within FLOAT_TOL relative or absolute (`math.isclose`) - the only place a tolerance applies.
- call-based tests: inputs[i] is the JSON list of positional arguments, outputs[i] the JSON
  result (tuples compare as lists; a one-element list [x] also accepts x, as in APPS/TACO);
  an expected int is matched exactly (an int, or a float of exactly that value), an expected
  float within FLOAT_TOL, a bool only by the same bool.
Optional record fields: `max_tests` (int >= 1), `per_test_timeout_s` (float > 0).
Every program runs in the bubblewrap sandbox (`rewards.sandbox`); no response text runs outside.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re

from rewards.extract import last_code_block
from rewards.registry import register
from rewards.sandbox import (STARTUP_BUDGET_S, SandboxLimits, find_bwrap, response_budget_s,
                             run_tests)

FLOAT_TOL = 1e-6  # relative and absolute tolerance, for expected FLOAT tokens/values only
DEFAULT_LIMITS = SandboxLimits()


def validate_code_record(record: dict) -> None:
    """ValueError naming the field when `record["tests"]` (or an option) is malformed."""
    tests = record["tests"]
    if isinstance(tests, str):
        raise ValueError("field 'tests': expected a dict, got a string (json.loads it first)")
    if not isinstance(tests, dict):
        raise ValueError(f"field 'tests': expected a dict, got {type(tests).__name__}")
    for key in ("inputs", "outputs"):
        if not isinstance(tests.get(key), list):
            raise ValueError(f"field 'tests.{key}': expected a list")
    if len(tests["inputs"]) != len(tests["outputs"]) or not tests["inputs"]:
        raise ValueError(
            f"field 'tests': inputs ({len(tests['inputs'])}) and outputs "
            f"({len(tests['outputs'])}) must be non-empty and of equal length"
        )
    fn_name = tests.get("fn_name")
    if fn_name is not None and (not isinstance(fn_name, str) or not fn_name.isidentifier()):
        raise ValueError(f"field 'tests.fn_name': expected an identifier, got {fn_name!r}")
    if fn_name is None and not all(isinstance(x, str) for x in tests["inputs"]):
        raise ValueError("field 'tests.inputs': stdin tests need string inputs")
    max_tests = record.get("max_tests")
    if max_tests is not None and (not isinstance(max_tests, int) or max_tests < 1):
        raise ValueError(f"field 'max_tests': expected an int >= 1, got {max_tests!r}")
    timeout = record.get("per_test_timeout_s")
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ValueError(f"field 'per_test_timeout_s': expected a number > 0, got {timeout!r}")


def _limits(record: dict) -> SandboxLimits:
    timeout = record.get("per_test_timeout_s")
    if timeout is None:
        return DEFAULT_LIMITS
    return dataclasses.replace(DEFAULT_LIMITS, per_test_timeout_s=float(timeout),
                               cpu_time_s=int(math.ceil(timeout)) + 1)


def _num_tests(record: dict) -> int:
    n = len(record["tests"]["inputs"])
    return min(n, record["max_tests"]) if record.get("max_tests") else n


def code_time_limit_s(record: dict) -> float:
    """Per-item limit for score_batch: the sandbox's own budget plus start-up slack."""
    return 2 * STARTUP_BUDGET_S + response_budget_s(_num_tests(record), _limits(record))


_INT_TOKEN_RE = re.compile(r"[-+]?\d+")
_FLOAT_TOKEN_RE = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def tokens_equal(got: str, expected: str) -> bool:
    """One whitespace-separated output token against the expected one (see module docstring).

    Integers are exact: `100000000000000001` never matches `100000000000000000`, and `5.0` does
    not match `5`. Only an expected float token gets the FLOAT_TOL tolerance (no `nan`, `inf`
    or Python-only spellings such as `1_000`).
    """
    if got == expected:
        return True
    if _INT_TOKEN_RE.fullmatch(expected):
        return _INT_TOKEN_RE.fullmatch(got) is not None and int(got) == int(expected)
    if _FLOAT_TOKEN_RE.fullmatch(expected) and _FLOAT_TOKEN_RE.fullmatch(got):
        return math.isclose(float(got), float(expected), rel_tol=FLOAT_TOL, abs_tol=FLOAT_TOL)
    return False


def stdout_matches(got: str, expected: str) -> bool:
    """Lenient stdout comparison (see module docstring)."""
    norm = lambda s: "\n".join(ln.rstrip() for ln in s.strip().splitlines())
    if norm(got) == norm(expected):
        return True
    got_t, exp_t = got.split(), expected.split()
    return len(got_t) == len(exp_t) and all(tokens_equal(a, b) for a, b in zip(got_t, exp_t))


def _json_equal(a, b) -> bool:
    """`a` (the program's JSON result) against `b` (the expected value)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(b, int) and isinstance(a, (int, float)):
        return a == b  # exact (Python compares int and float exactly)
    if isinstance(a, (int, float)) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=FLOAT_TOL, abs_tol=FLOAT_TOL)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return a == b


def call_result_matches(got_json: str, expected) -> bool:
    """JSON result of a call against the expected value (see module docstring)."""
    try:
        got = json.loads(got_json)
    except ValueError:
        return False
    expected = json.loads(json.dumps(expected))  # tuples -> lists
    if _json_equal(got, expected):
        return True
    return isinstance(expected, list) and len(expected) == 1 and _json_equal(got, expected[0])


def code_reward(program: str, tests: dict, *, max_tests: int | None = None,
                limits: SandboxLimits = DEFAULT_LIMITS) -> float:
    """Fraction of the first `max_tests` tests that `program` passes in the sandbox."""
    inputs, outputs = tests["inputs"], tests["outputs"]
    k = min(len(inputs), max_tests) if max_tests else len(inputs)
    fn_name = tests.get("fn_name")
    results = run_tests(program, inputs[:k], fn_name=fn_name, limits=limits)
    match = call_result_matches if fn_name else stdout_matches
    passed = sum(1 for r, exp in zip(results, outputs[:k])
                 if r["status"] == "ok" and match(r["out"], exp))
    return passed / k


@register("code", required_fields=("tests",), validate=validate_code_record,
          timeout_s=code_time_limit_s, requires=find_bwrap)  # no sandbox: refuse, never run
def score_code(record: dict, answer: str) -> float:
    """Registry entry for domain "code": the last ```python block of the answer region."""
    program = last_code_block(answer)
    if program is None or not program.strip():
        return 0.0
    return code_reward(program, record["tests"], max_tests=record.get("max_tests"),
                       limits=_limits(record))
