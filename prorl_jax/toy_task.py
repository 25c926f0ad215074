"""A procedurally generated task (domain "toy") that a tiny, randomly initialised Qwen2 can learn
with GRPO on 2 CPU cores within minutes: the CPU demo's data.

Each record follows the problem-record schema: {"domain": "toy", "prompt": str, "answer": str,
"id": str, "task": str}; `rewards/toy.py` scores it (1.0 exact, 0.5 right answer then junk, 0).
All prompts and answers use only characters of the shipped demo tokenizer.

Tasks, easiest first (answers are single digits, so a random policy over a ~60-token vocabulary
hits the first token with probability ~1/60 and gets a small but non-zero reward):
    copy        "copy 7"     -> "7"
    successor   "next 7"     -> "8"      ((d + 1) mod 10)
    add_mod10   "3+9 mod 10" -> "2"      ((a + b) mod 10)
    add         "23+19"      -> "42"     (two 2-digit numbers, answer up to 3 digits)

    python -m prorl_jax.toy_task --task copy --num 2000 --seed 0 --out toy_train.jsonl
"""
from __future__ import annotations

import argparse
import json
from typing import Callable

import numpy as np

DOMAIN = "toy"


def _copy(rng: np.random.Generator) -> tuple[str, str]:
    d = int(rng.integers(10))
    return f"copy {d}", str(d)


def _successor(rng: np.random.Generator) -> tuple[str, str]:
    d = int(rng.integers(10))
    return f"next {d}", str((d + 1) % 10)


def _add_mod10(rng: np.random.Generator) -> tuple[str, str]:
    a, b = (int(x) for x in rng.integers(10, size=2))
    return f"{a}+{b} mod 10", str((a + b) % 10)


def _add(rng: np.random.Generator) -> tuple[str, str]:
    a, b = (int(x) for x in rng.integers(10, 100, size=2))
    return f"{a}+{b}", str(a + b)


# name -> generator(rng) -> (prompt, answer)
TASKS: dict[str, Callable[[np.random.Generator], tuple[str, str]]] = {
    "copy": _copy,
    "successor": _successor,
    "add_mod10": _add_mod10,
    "add": _add,
}


def make_records(task: str, num: int, seed: int) -> list[dict]:
    """`num` records of toy task `task` (a name in TASKS, or several joined by "+", e.g.
    "copy+successor", drawn uniformly), deterministic in `seed`."""
    names = task.split("+")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"toy task {unknown[0]!r} unknown; expected one of {sorted(TASKS)} "
                         f"(or several joined by '+')")
    if num < 0:
        raise ValueError(f"toy task num: expected >= 0, got {num}")
    rng = np.random.default_rng(seed)
    records = []
    for i in range(num):
        name = names[int(rng.integers(len(names)))]
        prompt, answer = TASKS[name](rng)
        records.append({"domain": DOMAIN, "prompt": prompt, "answer": answer,
                        "task": name, "id": f"toy-{name}-{seed}-{i}"})
    return records


def write_jsonl(records: list[dict], path: str) -> None:
    """One JSON object per line."""
    with open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Writes toy-task records as jsonl.")
    parser.add_argument("--task", default="copy", help=f"one of {sorted(TASKS)}, or a+b")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    write_jsonl(make_records(args.task, args.num, args.seed), args.out)
    print(f"wrote {args.num} {args.task} records to {args.out}")


if __name__ == "__main__":
    main()
