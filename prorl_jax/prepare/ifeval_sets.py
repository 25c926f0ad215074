"""Instruction-following sources -> domain "ifeval" records {prompt, instruction_id_list, kwargs}.

nemotron_if (training; nvidia/Llama-Nemotron-Post-Training-Dataset, config RL, split
  instruction_following, file RL/instruction_following/instruction_following.jsonl, ~56k rows):
  {input: chat list, args: {instruction_id_list: [...], instruction_kwargs: [dict or None, ...]},
  system_prompt ("detailed thinking off"), reasoning, category, license, version,
  used_in_training}. The prompt is `input` as given; `system_prompt` is Llama-Nemotron's
  reasoning switch, meaningless to R1-style models, so it is dropped unless keep_system.
ifeval_input (validation; IFEval's own input_data.jsonl, or google/IFEval on the hub):
  {key, prompt, instruction_id_list, kwargs}.

Both go through `map_instructions`: each instruction id must be one the graders know
(`known_instructions()`, read from rewards.ifeval_checks.CHECKS and the checks' signatures at run
time), each kwarg name one that check takes (after KWARG_ALIASES), every required kwarg present;
None-valued kwargs (the fill of a union schema) and None kwarg dicts are dropped. A row that fails
is skipped with the reason naming the id or kwarg, so the summary counts every unknown id: no
instruction is ever silently scored 0.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

from prorl_jax.data import DataError
from prorl_jax.prepare.rows import SkipRow, chat_messages, json_value, text_field

# (instruction id, name in the data) -> name the check takes. From public loaders of the
# Nemotron data (some rows spell keywords:frequency's single keyword as a one-item `keywords`).
KWARG_ALIASES: dict[tuple[str, str], str] = {
    ("keywords:frequency", "keywords"): "keyword",
}


@functools.lru_cache(maxsize=1)
def known_instructions() -> dict[str, tuple[frozenset[str], frozenset[str]]]:
    """{instruction id: (required kwarg names, optional kwarg names)} of the graders' checks."""
    from rewards.ifeval_checks import CHECKS
    known = {}
    for iid, check in CHECKS.items():
        params = list(inspect.signature(check).parameters.values())[1:]  # after the response
        names = [p for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        known[iid] = (frozenset(p.name for p in names if p.default is p.empty),
                      frozenset(p.name for p in names if p.default is not p.empty))
    return known


def _kwargs_for(iid: str, raw: Any, where: str) -> dict:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise DataError(f"field {where!r}: expected a dict or null, got {raw!r:.80}")
    required, optional = known_instructions()[iid]
    out = {}
    for name, value in raw.items():
        if value is None:
            continue
        name = KWARG_ALIASES.get((iid, name), name)
        if (iid, name) == ("keywords:frequency", "keyword") and isinstance(value, list):
            if len(value) != 1 or not isinstance(value[0], str):
                raise SkipRow(f"instruction {iid!r}: {len(value)} keywords where one is counted")
            value = value[0]
        if name not in required and name not in optional:
            raise SkipRow(f"instruction {iid!r}: kwarg {name!r} unknown to its check")
        out[name] = value
    missing = sorted(required - set(out))
    if missing:
        raise SkipRow(f"instruction {iid!r}: kwarg {missing[0]!r} missing")
    return out


def map_instructions(ids: Any, kwargs: Any, ids_name: str = "instruction_id_list",
                     kwargs_name: str = "kwargs") -> tuple[list[str], list[dict]]:
    """(instruction ids, kwargs the checks take) of one row; SkipRow/DataError as documented."""
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise DataError(f"field {ids_name!r}: expected a non-empty list of strings, "
                        f"got {ids!r:.80}")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise DataError(f"field {kwargs_name!r}: expected a list of {len(ids)} dicts (one per "
                        f"instruction), got {kwargs!r:.80}")
    known = known_instructions()
    for iid in ids:
        if iid not in known:
            raise SkipRow(f"unknown instruction id {iid!r}")
    return list(ids), [_kwargs_for(iid, kw, f"{kwargs_name}[{j}]")
                       for j, (iid, kw) in enumerate(zip(ids, kwargs))]


def convert_nemotron_if(row: dict, *, keep_system: bool = False) -> dict:
    """A Llama-Nemotron RL instruction-following row -> an ifeval record."""
    prompt = row.get("input")
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": text_field(row, "input")}]
    else:
        messages = chat_messages(json_value(prompt, "input"), "input", keep_system=keep_system)
    system = row.get("system_prompt")
    if keep_system and isinstance(system, str) and system.strip() \
            and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}] + messages
    args = json_value(row.get("args"), "args")
    if not isinstance(args, dict):
        raise DataError(f"field 'args': expected {{instruction_id_list, instruction_kwargs}}, "
                        f"got {args!r:.80}")
    ids_name, kwargs_name = "args.instruction_id_list", "args.instruction_kwargs"
    ids, kwargs = map_instructions(json_value(args.get("instruction_id_list"), ids_name),
                                   json_value(args.get("instruction_kwargs"), kwargs_name),
                                   ids_name, kwargs_name)
    prompt = messages[0]["content"] if len(messages) == 1 else messages
    return {"domain": "ifeval", "prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs}


def convert_ifeval_input(row: dict) -> dict:
    """An IFEval input_data.jsonl row {key, prompt, instruction_id_list, kwargs} -> a record."""
    prompt = text_field(row, "prompt")
    ids, kwargs = map_instructions(json_value(row.get("instruction_id_list"),
                                              "instruction_id_list"),
                                   json_value(row.get("kwargs"), "kwargs"))
    record = {"domain": "ifeval", "prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs}
    if row.get("key") is not None:
        record["id"] = f"ifeval-{row['key']}"
    return record
