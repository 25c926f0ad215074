"""Logic puzzles (reasoning-gym, generated offline) -> domain "logic" records {task, entry, prompt}.

The task list is every task the recorded reliability scan kept (prorl_jax/prepare/logic_scan.py,
prorl_jax/assets/logic_tasks.json), minus whatever rewards.logic_grader.EXCLUDED_TASKS says at run
time. ProRL trained on 96 tasks / 37k problems: by default `total` = 37,000 problems are spread
evenly over the tasks. Each task is generated from its own seed, crc32("{seed}:{task}"), so adding
or removing a task leaves the other tasks' problems unchanged, and the held-out validation set
(another `seed`) starts far from the training problems; problems whose question is also in the
training set are dropped from it anyway (counted).
Prompt: reasoning-gym's own system prompt (asks for <answer>...</answer>) + the question.
"""
from __future__ import annotations

import concurrent.futures
import json
import warnings
import zlib
from typing import Iterable, Sequence

from prorl_jax.data import DataError, validate_record
from prorl_jax.prepare.logic_scan import load_record, reasoning_gym_version
from prorl_jax.prepare.rows import Report
from prorl_jax.prepare.templates import logic_prompt

PAPER_TOTAL = 37_000
TRAIN_SEED = 0
VAL_SEED = 1


def logic_tasks(tasks: Sequence[str] | None = None, record_path: str | None = None
                ) -> tuple[list[str], dict[str, str]]:
    """(tasks to generate, {task: why excluded}). Without `tasks`: every task the recorded scan
    kept; `tasks` must each be known to reasoning-gym and not excluded by the scan or by
    rewards.logic_grader.EXCLUDED_TASKS (DataError naming the task and the reason)."""
    import reasoning_gym.factory
    from rewards.logic_grader import EXCLUDED_TASKS
    record = load_record(record_path)
    if record["reasoning_gym_version"] != reasoning_gym_version():
        warnings.warn(f"the logic task scan was recorded with reasoning-gym "
                      f"{record['reasoning_gym_version']}, {reasoning_gym_version()} is "
                      f"installed: re-run `python launchers/prepare_data.py scan_logic`")
    excluded = dict(record["excluded"])
    excluded.update({t: "excluded by rewards.logic_grader.EXCLUDED_TASKS" for t in EXCLUDED_TASKS})
    if tasks is None:
        return [t for t in record["kept"] if t not in excluded], excluded
    for task in tasks:
        if task not in reasoning_gym.factory.DATASETS:
            raise DataError(f"reasoning-gym task {task!r}: unknown (see reasoning_gym.factory)")
        if task in excluded:
            raise DataError(f"reasoning-gym task {task!r}: excluded ({excluded[task]})")
    return list(tasks), excluded


def task_seed(task: str, seed: int) -> int:
    """The generator seed of `task` in the set seeded `seed` (independent of the task list)."""
    return zlib.crc32(f"{seed}:{task}".encode())


def _generate(task: str, size: int, seed: int) -> list[dict]:
    import reasoning_gym
    dataset = reasoning_gym.create_dataset(task, size=size, seed=task_seed(task, seed))
    return [json.loads(json.dumps(entry, default=str)) for entry in dataset]


def sizes_per_task(tasks: Sequence[str], total: int) -> list[int]:
    """`total` spread over the tasks: total // n each, the first total % n tasks one more."""
    n = len(tasks)
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


def generate_logic(tasks: Sequence[str] | None = None, *, total: int = PAPER_TOTAL,
                   size: int | None = None, seed: int = TRAIN_SEED, workers: int = 1,
                   exclude_questions: Iterable[str] = (), name: str = "logic"
                   ) -> tuple[list[dict], Report]:
    """Logic records (task by task, in task-list order) and the report of the generation.

    size: problems per task (overrides total); exclude_questions: questions not to repeat (the
    training set's, for a held-out set); workers: processes generating tasks in parallel."""
    tasks, _ = logic_tasks(tasks)
    if not tasks:
        raise DataError("reasoning-gym: no task left to generate")
    sizes = [size] * len(tasks) if size is not None else sizes_per_task(tasks, total)
    tasks, sizes = [t for t, n in zip(tasks, sizes) if n > 0], [n for n in sizes if n > 0]
    excluded_questions = set(exclude_questions)
    if workers > 1:
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            generated = list(pool.map(_generate, tasks, sizes, [seed] * len(tasks)))
    else:
        generated = [_generate(t, n, seed) for t, n in zip(tasks, sizes)]
    records, report = [], Report(name)
    for task, entries in zip(tasks, generated):
        for i, entry in enumerate(entries):
            report.read += 1
            if entry["question"] in excluded_questions:
                report.skipped["question also in the training set"] += 1
                continue
            record = {"domain": "logic", "task": task, "entry": entry,
                      "prompt": logic_prompt(entry["question"]),
                      "id": f"gym-{task}-{seed}-{i}", "source": "reasoning_gym"}
            records.append(validate_record(record, f"reasoning-gym {task} problem {i}"))
            report.written += 1
    return records, report


def questions_of(records: Iterable[dict]) -> set[str]:
    """The reasoning-gym questions of logic records (to hold them out of another set)."""
    return {r["entry"]["question"] for r in records if r.get("domain") == "logic"}
