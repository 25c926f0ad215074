"""Converts ProRL's public training sets into this project's problem-record schema (jsonl).

    python launchers/prepare_data.py deepscaler  --input ROWS --out data/math.jsonl
    python launchers/prepare_data.py eurus_code  --input ROWS --out data/code.jsonl
    python launchers/prepare_data.py scp116k     --input ROWS --out data/stem.jsonl
    python launchers/prepare_data.py nemotron_if --input ROWS --out data/ifeval.jsonl
    python launchers/prepare_data.py reasoning_gym --tasks graph_color,sudoku,family_relationships \\
        --size 1000 --seed 0 --out data/logic.jsonl

ROWS is a local .jsonl/.json/.parquet file in the source's own format, or (with the `datasets`
library installed and internet access) a hub dataset name, e.g. agentica-org/DeepScaleR-Preview-
Dataset, PRIME-RL/Eurus-2-RL-Data, EricLu/SCP-116K, nvidia/Llama-Nemotron-Post-Training-Dataset
(--hf_config RL --split instruction_following). reasoning-gym problems are generated here,
offline (pip install reasoning-gym).

Source formats read (field names from the datasets' cards; see each converter):
    deepscaler   {problem, answer, solution}                        -> math {prompt, answer}
    eurus_code   {prompt: chat list, ability, reward_model: {ground_truth: JSON str of
                 {inputs, outputs, fn_name?}}, data_source}          -> code {prompt, tests}
    scp116k      {domain, problem, matched_solution, o1_solution, qwq_solution,
                 is_o1_solution_same_with_matched_solution, ...}    -> stem {prompt, answer}
                 (answer: the last \\boxed{} of the matched solution; rows without one skipped)
    nemotron_if  {prompt or input (str or chat list), instruction_id_list, kwargs}
                                                                    -> ifeval
Every output record is checked with prorl_jax.data.validate_record. A row that cannot be
converted stops the run with its file, row and field, unless --skip_bad (then it is counted).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Iterable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from prorl_jax.data import DataError, read_rows, validate_record  # noqa: E402
from rewards.extract import last_boxed  # noqa: E402

MATH_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
LOGIC_INSTRUCTION = "Give your final answer inside <answer> </answer> tags."


class SkipRow(Exception):
    """The row is valid in its source but not usable here (e.g. a math row in the code set)."""


def _field(row: dict, name: str, kind: type | tuple = str) -> Any:
    value = row.get(name)
    if value is None or not isinstance(value, kind) or (isinstance(value, str) and not value.strip()):
        expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(f"field {name!r}: expected a non-empty {expected}, got {value!r:.80}")
    return value


def convert_deepscaler(row: dict) -> dict:
    """DeepScaleR-Preview {problem, answer, solution} -> a math record."""
    problem, answer = _field(row, "problem"), _field(row, "answer", (str, int, float))
    return {"domain": "math", "prompt": f"{problem.strip()} {MATH_INSTRUCTION}",
            "answer": str(answer).strip(), "source": "deepscaler"}


def _json_field(row: dict, value: Any, name: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"field {name!r}: not valid JSON ({e})") from None
    return value


def convert_eurus_code(row: dict, keep_system: bool = False) -> dict:
    """Eurus-2-RL-Data code row -> a code record; math rows (ability != "code") are skipped.
    tests = {"inputs": [...], "outputs": [...], "fn_name"?} from reward_model.ground_truth."""
    if row.get("ability", "code") != "code":
        raise SkipRow(f"ability {row.get('ability')!r}")
    messages = _field(row, "prompt", list)
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise DataError(f"field 'prompt' message {j}: expected {{role, content}}, got {m!r:.80}")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages
                if keep_system or m["role"] != "system"]
    reward_model = _field(row, "reward_model", dict)
    tests = _json_field(row, reward_model.get("ground_truth"), "reward_model.ground_truth")
    if not isinstance(tests, dict) or not isinstance(tests.get("inputs"), list) \
            or not isinstance(tests.get("outputs"), list) \
            or len(tests["inputs"]) != len(tests["outputs"]) or not tests["inputs"]:
        raise DataError("field 'reward_model.ground_truth': expected JSON {inputs: [...], "
                        "outputs: [...] of the same non-zero length, fn_name?}")
    kept = {"inputs": tests["inputs"], "outputs": tests["outputs"]}
    if tests.get("fn_name"):
        kept["fn_name"] = tests["fn_name"]
    return {"domain": "code", "prompt": messages, "tests": kept,
            "source": str(row.get("data_source", "eurus"))}


def convert_scp116k(row: dict, require_agreement: bool = False) -> dict:
    """SCP-116K row -> a stem record whose answer is the last \\boxed{} of the matched solution.
    require_agreement: keep only rows where o1-mini or QwQ agreed with the matched solution."""
    problem = _field(row, "problem")
    solution = _field(row, "matched_solution")
    if require_agreement and not (row.get("is_o1_solution_same_with_matched_solution")
                                  or row.get("is_qwq_solution_same_with_matched_solution")):
        raise SkipRow("no model solution agrees with the matched solution")
    answer = last_boxed(solution)
    if not answer or not answer.strip():
        raise SkipRow("matched_solution has no \\boxed{} answer")
    return {"domain": "stem", "prompt": f"{problem.strip()} {MATH_INSTRUCTION}",
            "answer": answer.strip(), "subject": str(row.get("domain", "")), "source": "scp116k"}


def convert_nemotron_if(row: dict) -> dict:
    """Llama-Nemotron RL instruction-following row -> an ifeval record. The prompt is `prompt`
    or `input` (a string or chat messages); `kwargs` may be a JSON string; None-valued kwargs
    (parquet fill) are dropped."""
    prompt = row.get("prompt") if row.get("prompt") is not None else row.get("input")
    if isinstance(prompt, list):
        prompt = [{"role": m.get("role"), "content": m.get("content")} for m in prompt
                  if isinstance(m, dict)]
    elif not isinstance(prompt, str):
        raise DataError(f"field 'prompt'/'input': expected a string or chat messages, "
                        f"got {prompt!r:.80}")
    ids = _json_field(row, row.get("instruction_id_list"), "instruction_id_list")
    kwargs = _json_field(row, row.get("kwargs"), "kwargs")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise DataError(f"field 'instruction_id_list': expected a non-empty list of strings, "
                        f"got {ids!r:.80}")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise DataError(f"field 'kwargs': expected a list of {len(ids)} dicts (one per "
                        f"instruction), got {kwargs!r:.80}")
    kwargs = [{k: v for k, v in (kw or {}).items() if v is not None} for kw in kwargs]
    return {"domain": "ifeval", "prompt": prompt, "instruction_id_list": ids,
            "kwargs": kwargs, "source": "nemotron_if"}


def generate_reasoning_gym(tasks: list[str], size: int, seed: int) -> list[dict]:
    """`size` problems per reasoning-gym task as logic records {task, entry} (generated by
    rewards.logic_grader.logic_records, which refuses tasks with broken scorers), the prompt
    asking for the <answer> tags that grader reads."""
    from rewards.logic_grader import logic_records
    try:
        records = logic_records(tasks, size=size, seed=seed)
    except (ValueError, KeyError) as e:
        raise DataError(f"reasoning-gym tasks {tasks}: {e}") from None
    for i, rec in enumerate(records):
        rec["prompt"] = f"{rec['entry']['question']}\n{LOGIC_INSTRUCTION}"
        rec["id"] = f"gym-{rec['task']}-{seed}-{i}"
        rec["source"] = "reasoning_gym"
    return records


CONVERTERS: dict[str, Callable[..., dict]] = {
    "deepscaler": convert_deepscaler,
    "eurus_code": convert_eurus_code,
    "scp116k": convert_scp116k,
    "nemotron_if": convert_nemotron_if,
}


def read_source_rows(spec: str, split: str, hf_config: str | None) -> Iterable[tuple[str, Any]]:
    """(location, row) pairs from a local file, or from a hub dataset via `datasets`."""
    if os.path.exists(spec) or spec.endswith((".jsonl", ".json", ".parquet")):
        return read_rows(spec)
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: no such file, and the `datasets` library (needed for hub "
                        f"names) is not installed") from None
    ds = datasets.load_dataset(spec, hf_config, split=split)
    return ((f"{spec}[{split}] row {i}", row) for i, row in enumerate(ds))


def convert_rows(source: str, rows: Iterable[tuple[str, Any]], *, limit: int | None = None,
                 skip_bad: bool = False, **options) -> tuple[list[dict], dict[str, int]]:
    """Converts and validates rows; returns (records, counts: read/written/skipped/bad)."""
    convert = CONVERTERS[source]
    records, counts = [], {"read": 0, "written": 0, "skipped": 0, "bad": 0}
    for where, row in rows:
        if limit is not None and counts["written"] >= limit:
            break
        counts["read"] += 1
        try:
            if not isinstance(row, dict):
                raise DataError(f"expected an object, got {type(row).__name__}")
            rec = convert(row, **options)
            rec.setdefault("id", f"{source}-{counts['read'] - 1}")
            validate_record(rec, where)
        except SkipRow:
            counts["skipped"] += 1
            continue
        except DataError as e:
            msg = str(e) if str(e).startswith(where) else f"{where}: {e}"
            if not skip_bad:
                raise DataError(f"{msg} ({source} format)") from None
            counts["bad"] += 1
            continue
        records.append(rec)
        counts["written"] += 1
    return records, counts


def write_jsonl(records: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def parse_args(argv):
    p = argparse.ArgumentParser(description="Converts public RL datasets to problem records.")
    p.add_argument("source", choices=sorted(CONVERTERS) + ["reasoning_gym"])
    p.add_argument("--input", help="local .jsonl/.json/.parquet, or a hub dataset name")
    p.add_argument("--out", required=True, help="output .jsonl")
    p.add_argument("--split", default="train", help="hub split")
    p.add_argument("--hf_config", default=None, help="hub dataset config (Nemotron: RL)")
    p.add_argument("--limit", type=int, default=None, help="stop after N records written")
    p.add_argument("--skip_bad", action="store_true", help="count bad rows instead of failing")
    p.add_argument("--keep_system", action="store_true", help="eurus_code: keep system prompts")
    p.add_argument("--require_agreement", action="store_true",
                   help="scp116k: only rows where o1-mini or QwQ agreed with the matched solution")
    p.add_argument("--tasks", default="graph_color,sudoku,family_relationships",
                   help="reasoning_gym: comma-separated task names")
    p.add_argument("--size", type=int, default=1000, help="reasoning_gym: problems per task")
    p.add_argument("--seed", type=int, default=0, help="reasoning_gym: generator seed")
    args = p.parse_args(argv)
    if args.source != "reasoning_gym" and not args.input:
        p.error(f"{args.source}: --input is required")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.source == "reasoning_gym":
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        records = generate_reasoning_gym(tasks, args.size, args.seed)
        for i, rec in enumerate(records):
            validate_record(rec, f"generated record {i}")
        counts = {"written": len(records)}
    else:
        options = {"eurus_code": {"keep_system": args.keep_system},
                   "scp116k": {"require_agreement": args.require_agreement}}.get(args.source, {})
        rows = read_source_rows(args.input, args.split, args.hf_config)
        records, counts = convert_rows(args.source, rows, limit=args.limit,
                                       skip_bad=args.skip_bad, **options)
    write_jsonl(records, args.out)
    print(f"{args.source}: {counts} -> {args.out}")


if __name__ == "__main__":
    main()
