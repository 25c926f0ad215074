"""Which reasoning-gym tasks generate and score reliably: the logic set's task list, measured.

    python launchers/prepare_data.py scan_logic [--size 20] [--seed 0]   # rewrites the record

For each task registered in reasoning-gym, `scan_task` generates `size` problems twice with the
same seed and scores answers through the project's own scoring path
(`rewards.logic_grader.logic_reward` on `<answer>...</answer>`, after the entry went through
JSON, as it does in a data file). A task is kept when all of these hold:
  generates       create_dataset(task, size, seed) works offline and every entry is JSON-safe;
  deterministic   the same seed gives the same entries;
  reference       every entry has a reference answer (its `answer`, else a metadata example
                  answer: REFERENCE_KEYS) and that answer scores exactly 1.0;
  empty/garbage   `<answer></answer>` (where the reference is not empty itself) and
                  `<answer>GARBAGE</answer>` score <= WRONG_MAX;
  wrong           another entry's (different) reference answer scores < 1.0 on at least
                  (1 - CROSS_FULL_MAX) of the pairs tried (a verifier may accept some of them:
                  two graphs can share a valid colouring);
  excluded        the task is not in rewards.logic_grader.EXCLUDED_TASKS (read at run time).
The result is recorded in prorl_jax/assets/logic_tasks.json (`record_path()`), which the logic
set generator reads; the README lists the excluded tasks and why.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any

WRONG_MAX = 0.05        # most a wrong or empty answer may score (reasoning-gym pays 0.01-0.05
                        # "format credit" in some tasks; anything above is a broken scorer)
CROSS_FULL_MAX = 0.5    # most pairs (entry i, another entry's answer) that may score 1.0
GARBAGE = "zq xv 17 !"  # not an answer to any reasoning-gym task
REFERENCE_KEYS = ("possible_answer", "example_answer", "example_correct_answer")
TASK_TIME_LIMIT_S = 300
RECORD_NAME = "logic_tasks.json"


@dataclasses.dataclass
class TaskScan:
    """One task's scan: kept or not, why, and the scores measured (max/min over entries)."""
    task: str
    kept: bool
    reason: str = ""
    reference: str = ""          # where the reference answer came from ("answer", metadata key)
    reference_min: float = -1.0  # lowest score of a reference answer (must be 1.0)
    empty_max: float = -1.0
    garbage_max: float = -1.0
    cross_full: float = -1.0     # fraction of cross pairs scoring 1.0
    seconds_per_problem: float = 0.0


def record_path() -> str:
    """Where the scan result is kept (package data)."""
    return os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "assets", RECORD_NAME))


def _json_safe(entry: dict) -> dict:
    return json.loads(json.dumps(entry, default=str))


def reference_answer(entry: dict) -> tuple[str | None, str]:
    """(reference answer text, its source) of a reasoning-gym entry; (None, "") if none."""
    if entry.get("answer") is not None:
        return str(entry["answer"]), "answer"
    metadata = entry.get("metadata") or {}
    for key in REFERENCE_KEYS:
        value = metadata.get(key)
        if value is not None:
            return (value if isinstance(value, str) else json.dumps(value)), f"metadata.{key}"
    return None, ""


def _generate(task: str, size: int, seed: int, as_json: bool = True) -> list[dict]:
    import reasoning_gym
    entries = list(reasoning_gym.create_dataset(task, size=size, seed=seed))
    return [_json_safe(e) for e in entries] if as_json else entries


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _scores(task: str, entries: list[dict], refs: list[str]) -> dict[str, float]:
    from rewards.logic_grader import logic_reward

    def score(entry: dict, text: str) -> float:
        return logic_reward(task, entry, f"<answer>{text}</answer>")

    cross = [score(entries[i], refs[j]) for i in range(len(entries))
             for j in (i + 1, i + 2) if j < len(entries) and refs[j] != refs[i]]
    return {
        "reference_min": min(score(e, r) for e, r in zip(entries, refs)),
        "empty_max": max((score(e, "") for e, r in zip(entries, refs) if r.strip()), default=0.0),
        "garbage_max": max(score(e, GARBAGE) for e in entries),
        "cross_full": sum(c >= 1.0 for c in cross) / len(cross) if cross else 0.0,
    }


def _verdict(scan: TaskScan, raw_reference_min: float) -> str:
    """The first failed criterion, or "" when the task is kept."""
    if scan.reference_min < 1.0:
        return (f"its reference answer scores {scan.reference_min:.2f}, not 1.0"
                + (" once the entry went through JSON (1.0 before: the scorer needs Python "
                   "objects JSON does not keep)" if raw_reference_min >= 1.0 else ""))
    if scan.empty_max > WRONG_MAX:
        return f"an empty answer scores {scan.empty_max:.2f} (> {WRONG_MAX})"
    if scan.garbage_max > WRONG_MAX:
        return f"a garbage answer scores {scan.garbage_max:.2f} (> {WRONG_MAX})"
    if scan.cross_full > CROSS_FULL_MAX:
        return (f"another problem's answer scores 1.0 on {scan.cross_full:.0%} of the pairs "
                f"(> {CROSS_FULL_MAX:.0%})")
    return ""


def scan_task(task: str, size: int = 20, seed: int = 0) -> TaskScan:
    """Scans one task (see the module docstring); never raises for a task's own failures."""
    from rewards.logic_grader import EXCLUDED_TASKS
    if task in EXCLUDED_TASKS:
        return TaskScan(task, False, "excluded by rewards.logic_grader.EXCLUDED_TASKS")
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TASK_TIME_LIMIT_S)
    start = time.monotonic()
    try:
        entries = _generate(task, size, seed)
        seconds = (time.monotonic() - start) / max(size, 1)
        if entries != _generate(task, size, seed):
            return TaskScan(task, False, "not deterministic: the same seed gave other problems",
                            seconds_per_problem=seconds)
        refs_and_sources = [reference_answer(e) for e in entries]
        if any(r is None for r, _ in refs_and_sources):
            return TaskScan(task, False, "no reference answer to check its scorer with "
                            "(answer is None, no metadata example)", seconds_per_problem=seconds)
        refs = [r for r, _ in refs_and_sources]
        scan = TaskScan(task, True, reference=refs_and_sources[0][1], seconds_per_problem=seconds,
                        **_scores(task, entries, refs))
    except _Timeout:
        return TaskScan(task, False, f"generation or scoring took over {TASK_TIME_LIMIT_S} s")
    except Exception as e:  # a task that cannot generate offline, or whose entries break
        return TaskScan(task, False, f"does not generate: {type(e).__name__}: {str(e)[:120]}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    raw_min = scan.reference_min
    if scan.reference_min < 1.0:  # is it the JSON round trip? (a data file is JSON)
        raw = _generate(task, size, seed, as_json=False)
        raw_min = _scores(task, raw, refs)["reference_min"]
    scan.reason = _verdict(scan, raw_min)
    scan.kept = not scan.reason
    return scan


def scan_all(size: int = 20, seed: int = 0, tasks: list[str] | None = None,
             log=print) -> list[TaskScan]:
    """Scans every reasoning-gym task (or `tasks`), in name order."""
    import reasoning_gym.factory
    names = sorted(tasks if tasks is not None else reasoning_gym.factory.DATASETS)
    scans = []
    for name in names:
        scans.append(scan_task(name, size, seed))
        s = scans[-1]
        log(f"{name:32s} {'kept' if s.kept else 'EXCLUDED':8s} {s.reason}")
    return scans


def write_record(scans: list[TaskScan], size: int, seed: int, path: str | None = None) -> str:
    """Writes the scan result (atomically) with the reasoning-gym version it was measured on."""
    path = path or record_path()
    record = {
        "reasoning_gym_version": reasoning_gym_version(),
        "size": size, "seed": seed,
        "criteria": {"wrong_max": WRONG_MAX, "cross_full_max": CROSS_FULL_MAX,
                     "garbage": GARBAGE, "reference_keys": list(REFERENCE_KEYS)},
        "kept": [s.task for s in scans if s.kept],
        "excluded": {s.task: s.reason for s in scans if not s.kept},
        "scans": [dataclasses.asdict(s) for s in scans],
    }
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def reasoning_gym_version() -> str:
    """The installed reasoning-gym's version (its package metadata: its __version__ lags)."""
    import importlib.metadata
    return importlib.metadata.version("reasoning_gym")


def load_record(path: str | None = None) -> dict[str, Any]:
    """The recorded scan (see `write_record`)."""
    with open(path or record_path()) as f:
        return json.load(f)
