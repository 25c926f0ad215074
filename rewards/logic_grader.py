"""Logic-puzzle domain (continuous): reasoning-gym's scorer on the extracted `<answer>`.

    R = score_answer_task(last_tagged(answer, "answer"), entry)   in [0, 1]
    R = 0 when there is no `<answer>...</answer>` or the scorer raises.

Record: `task` (a reasoning-gym dataset name) and `entry` ({question, answer, metadata}, as
generated; it may have been through JSON). Tasks in EXCLUDED_TASKS are refused (their scorers are
known to be broken). Tasks that keep reasoning-gym's default scorer (exact match, else
len(oracle)/len(answer) when the oracle is a substring - which rewards padding the answer with
guesses) are scored by exact match of the stripped strings instead (STRICT_DEFAULT_SCORER).

`logic_records(tasks, size, seed)` generates seeded problem sets as records (no download).
"""
from __future__ import annotations

import functools
import json
from typing import Callable

from rewards.extract import last_tagged
from rewards.registry import register

# game_of_life_halting: scores any non-empty string 1.0 (checked with reasoning-gym 0.1.25).
EXCLUDED_TASKS = frozenset({"game_of_life_halting"})
STRICT_DEFAULT_SCORER = True
PAPER_TASKS = ("graph_color", "sudoku", "boxnet", "family_relationships")  # named in ProRL


def _known_tasks() -> frozenset[str]:
    import reasoning_gym.factory

    return frozenset(reasoning_gym.factory.DATASETS)


def validate_logic_record(record: dict) -> None:
    """ValueError naming the field when `task` or `entry` is unusable."""
    task = record["task"]
    if not isinstance(task, str) or task not in _known_tasks():
        raise ValueError(f"field 'task': {task!r} is not a reasoning-gym task")
    if task in EXCLUDED_TASKS:
        raise ValueError(f"field 'task': {task!r} is excluded (its scorer is known to be broken)")
    entry = record["entry"]
    if not isinstance(entry, dict) or "answer" not in entry or "metadata" not in entry:
        raise ValueError("field 'entry': expected a dict with 'question', 'answer', 'metadata'")


def _strict_exact(answer: str | None, entry: dict) -> float:
    oracle = entry["answer"]
    return 1.0 if isinstance(answer, str) and answer.strip() == str(oracle).strip() else 0.0


@functools.lru_cache(maxsize=None)
def scorer_for(task: str) -> Callable[[str | None, dict], float]:
    """The scoring function used for `task` (reasoning-gym's, or the strict exact match)."""
    import reasoning_gym.factory
    from reasoning_gym.dataset import ProceduralDataset

    dataset_cls, config_cls = reasoning_gym.factory.DATASETS[task]
    if STRICT_DEFAULT_SCORER and dataset_cls.score_answer is ProceduralDataset.score_answer:
        return _strict_exact
    return dataset_cls(config=config_cls()).score_answer


def logic_reward(task: str, entry: dict, answer: str) -> float:
    """Score of the last `<answer>` of `answer` for `entry`; 0 on no answer or scorer error."""
    extracted = last_tagged(answer, "answer")
    if extracted is None:
        return 0.0
    try:
        value = float(scorer_for(task)(extracted, entry))
    except Exception:  # reasoning-gym scorers raise on malformed answers
        return 0.0
    return min(max(value, 0.0), 1.0) if value == value else 0.0


@register("logic", required_fields=("task", "entry"), validate=validate_logic_record)
def score_logic(record: dict, answer: str) -> float:
    """Registry entry for domain "logic"."""
    return logic_reward(record["task"], record["entry"], answer)


def logic_records(tasks: tuple[str, ...] | list[str] = PAPER_TASKS, size: int = 16,
                  seed: int = 0) -> list[dict]:
    """Seeded reasoning-gym problems as JSON-safe records {domain, task, entry, prompt}.

    `size` problems per task; the same (tasks, size, seed) always gives the same records.
    """
    import reasoning_gym

    known = _known_tasks()
    records = []
    for k, task in enumerate(tasks):
        if task not in known or task in EXCLUDED_TASKS:
            raise ValueError(f"logic_records: task {task!r} is unknown or excluded")
        dataset = reasoning_gym.create_dataset(task, size=size, seed=seed + 1000 * k)
        for entry in dataset:
            entry = json.loads(json.dumps(entry, default=str))
            records.append({"domain": "logic", "task": task, "entry": entry,
                            "prompt": entry["question"]})
    return records
