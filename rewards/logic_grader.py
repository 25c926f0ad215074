"""Logic-puzzle domain: the strict score of the extracted `<answer>` (binary, see logic_strict).

    R = strict_score_task(last_tagged(answer, "answer"), entry)   in {0, 1}
    R = 0 when there is no `<answer>...</answer>`, it is longer than MAX_ANSWER_CHARS, or the
        scorer raises.

Record: `task` (a reasoning-gym dataset name) and `entry` ({question, answer, metadata}, as
generated; it may have been through JSON). Tasks in EXCLUDED_TASKS (task -> reason) are refused:
no strict scorer exists for them. Every other task is scored by `rewards.logic_strict`: exact
match for tasks with reasoning-gym's default scorer, reasoning-gym's full credit only (no partial
credit) for tasks with their own verifier, and the project's own scorer where that full credit is
gameable (OWN_SCORERS). `scoring_mode(task)` tells which; reasoning-gym's partial credit is never
paid (it rewards non-answers).

`logic_records(tasks, size, seed)` generates seeded problem sets as records (no download).
"""
from __future__ import annotations

import functools
import json
from typing import Callable

from rewards import logic_strict
from rewards.extract import last_tagged
from rewards.registry import register

# task -> why it is not scored (checked with reasoning-gym 0.1.25). The single place that says
# which tasks are excluded: data converters read it to leave them out of training sets.
EXCLUDED_TASKS: dict[str, str] = {
    "game_of_life_halting": "its scorer gives 1.0 to any non-empty string",
    "propositional_logic": "any valid consequence of the premises earns full credit: restating "
                           "(or weakening) a premise scores 1.0 on most entries",
    "composite": "a mixture of other tasks, not a task (its entries name their own task)",
}
STRICT_DEFAULT_SCORER = True  # kept for compatibility: default-scorer tasks use exact match
MAX_ANSWER_CHARS = 16 * 1024  # longer <answer> contents score 0 (no scorer reads them)
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
        raise ValueError(f"field 'task': {task!r} is excluded: {EXCLUDED_TASKS[task]}")
    entry = record["entry"]
    if not isinstance(entry, dict) or "answer" not in entry or "metadata" not in entry:
        raise ValueError("field 'entry': expected a dict with 'question', 'answer', 'metadata'")


@functools.lru_cache(maxsize=None)
def _strict(task: str) -> tuple[str, Callable[[str, dict], float]]:
    import reasoning_gym.factory
    from reasoning_gym.dataset import ProceduralDataset

    dataset_cls, config_cls = reasoning_gym.factory.DATASETS[task]
    default = dataset_cls.score_answer is ProceduralDataset.score_answer
    return logic_strict.strict_scorer(task, dataset_cls(config=config_cls()).score_answer, default)


def scorer_for(task: str) -> Callable[[str, dict], float]:
    """The strict scoring function used for `task`: (answer, entry) -> 0.0 or 1.0."""
    return _strict(task)[1]


def scoring_mode(task: str) -> str:
    """How `task` is scored: "exact", "full_credit" or "own" (see rewards.logic_strict)."""
    return _strict(task)[0]


def logic_reward(task: str, entry: dict, answer: str) -> float:
    """Score of the last `<answer>` of `answer` for `entry`; 0 on no answer or scorer error."""
    extracted = last_tagged(answer, "answer")
    if extracted is None or len(extracted) > MAX_ANSWER_CHARS:
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
