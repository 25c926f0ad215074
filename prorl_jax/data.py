"""Prompt data: problem records read from files, tokenised with the chat template, mixed across
domains by weight, served in a deterministic, resumable order.

A problem record is a dict (one line of a .jsonl file, one element of a .json list, one row of a
.parquet file):
    prompt:  str, or a list of chat messages [{"role": "system"|"user"|"assistant", "content": str}]
    domain:  "math" | "stem" | "code" | "logic" | "ifeval" | "toy" | any domain registered in
             the rewards registry (which validates it), plus that domain's fields (math/stem:
             answer; code: tests; logic: task, entry; ifeval: instruction_id_list, kwargs;
             toy: answer)
    id:      optional
Bad rows raise `DataError` naming the file, the line (jsonl: 1-based line; json/parquet: 0-based
row) and the field.

Mixing: sources [(path_or_records, weight)]; draw k (k = 0, 1, ...) picks source s with
probability weight_s / sum(weights), from a generator seeded by (seed, k) alone, then takes the
next prompt of that source's current epoch, whose order is a permutation seeded by
(seed, s, epoch). So the order depends only on (seed, number of prompts drawn): batches of 4 then
4 give the same prompts as one batch of 8, and `state_dict()` is a few integers per source.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Sequence, Union

import numpy as np

CHAT_ROLES = ("system", "user", "assistant")

RecordSource = Union[str, os.PathLike, Sequence[dict]]


class DataError(ValueError):
    """A data file or record is not in the expected format (the message says where and why)."""


def _validate_domain_fields(record: dict, where: str) -> None:
    """The rewards registry checks the domain and its required fields (and the domain's own
    validate hook); importing `rewards` registers every domain's verifier."""
    import rewards  # noqa: F401
    from rewards.registry import get_domain
    try:
        get_domain(record)
    except ValueError as e:  # rewards' RecordError names the field
        raise DataError(f"{where}: {e}") from None


def validate_record(record: Any, where: str) -> dict:
    """Checks `prompt`, `domain` and the domain's required fields (through the rewards
    registry); returns the record. `where` (e.g. "train.jsonl line 3") prefixes every error."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object (problem record), "
                        f"got {type(record).__name__}")
    domain = record.get("domain")
    if not isinstance(domain, str) or not domain:
        raise DataError(f"{where}: field 'domain': expected a non-empty string, got {domain!r}")
    _validate_prompt(record.get("prompt"), where)
    _validate_domain_fields(record, where)
    return record


def _validate_prompt(prompt: Any, where: str) -> None:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: field 'prompt': expected a non-empty string")
        return
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where}: field 'prompt': expected a string or a non-empty list of "
                        f"chat messages {{role, content}}, got {type(prompt).__name__}")
    for j, msg in enumerate(prompt):
        if not isinstance(msg, dict) or msg.get("role") not in CHAT_ROLES \
                or not isinstance(msg.get("content"), str):
            raise DataError(f"{where}: field 'prompt' message {j}: expected "
                            f"{{'role': one of {list(CHAT_ROLES)}, 'content': str}}, got {msg!r}")


def read_rows(path: str | os.PathLike) -> list[tuple[str, Any]]:
    """Raw rows of a .jsonl, .json (a list) or .parquet file, each with its location
    ("FILE line N" for jsonl, 1-based; "FILE row N" otherwise, 0-based); no validation."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: data file not found")
    if path.endswith(".jsonl"):
        return [(f"{path} line {line}", row) for line, row in _read_jsonl(path)]
    if path.endswith(".json"):
        with open(path) as f:
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
    elif path.endswith(".parquet"):
        rows = _read_parquet(path)
    else:
        raise DataError(f"{path}: unknown data file type; expected .jsonl, .json or .parquet")
    return [(f"{path} row {i}", row) for i, row in enumerate(rows)]


def load_records(path: str | os.PathLike) -> list[dict]:
    """Validated problem records from a .jsonl, .json (a list of objects) or .parquet file."""
    return [validate_record(row, where) for where, row in read_rows(path)]


def _read_jsonl(path: str) -> Iterable[tuple[int, Any]]:
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {line_no}: not valid JSON ({e})") from None


def _read_parquet(path: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({e})") from None


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt ready for rollout: its record, token ids [prompt_len], and where it came from
    (source index, index within that source's kept records)."""
    record: dict
    prompt_ids: list[int]
    source: int
    index: int


@dataclasses.dataclass
class _Source:
    name: str
    weight: float
    records: list[dict]
    prompt_ids: list[list[int]]
    num_dropped: int


def encode_prompts(records: Sequence[dict], tokenizer, *, chat_template: bool = True
                   ) -> list[list[int]]:
    """Token ids of each record's prompt. With `chat_template`, the prompt (a string becomes one
    user message) goes through tokenizer.apply_chat_template(add_generation_prompt=True);
    without, a string prompt is encoded as is (list prompts then raise DataError)."""
    if not records:
        return []
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("tokenizer has no chat template: pass chat_template=False (raw "
                            "string prompts) or use a tokenizer that has one")
        texts = [tokenizer.apply_chat_template(_as_messages(r["prompt"]), tokenize=False,
                                               add_generation_prompt=True) for r in records]
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    for i, r in enumerate(records):
        if not isinstance(r["prompt"], str):
            raise DataError(f"record {i} (id {r.get('id')!r}): field 'prompt' is a chat message "
                            f"list, which needs chat_template=True")
    texts = [r["prompt"] for r in records]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]


def _as_messages(prompt: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


class PromptDataset:
    """Prompts from several sources, tokenised once, over-long ones dropped and counted.

    sources: [(path or list of records, mixing weight >= 0)]; weights need not sum to 1.
    max_prompt_tokens: prompts with more tokens are dropped (None: keep all).
    Attributes: num_dropped (total), num_dropped_by_source, sources' sizes via `sizes`.
    """

    def __init__(self, sources: Sequence[tuple[RecordSource, float]], tokenizer, *,
                 max_prompt_tokens: int | None = None, seed: int = 0, chat_template: bool = True):
        if not sources:
            raise DataError("PromptDataset: expected at least one (path_or_records, weight) source")
        if max_prompt_tokens is not None and max_prompt_tokens <= 0:
            raise DataError(f"max_prompt_tokens: expected a positive int or None, "
                            f"got {max_prompt_tokens}")
        self.seed = int(seed)
        self.max_prompt_tokens = max_prompt_tokens
        self.sources = [self._load_source(i, src, tokenizer, chat_template)
                        for i, src in enumerate(sources)]
        weights = np.array([s.weight for s in self.sources], np.float64)
        if weights.sum() <= 0:
            raise DataError(f"source weights: expected at least one positive, got {list(weights)}")
        self.probabilities = weights / weights.sum()

    def _load_source(self, i: int, source, tokenizer, chat_template: bool) -> _Source:
        try:
            data, weight = source
        except (TypeError, ValueError):
            raise DataError(f"source {i}: expected a (path_or_records, weight) pair, "
                            f"got {source!r}") from None
        if isinstance(data, (str, os.PathLike)):
            name, records = os.fspath(data), load_records(data)
        else:
            name = f"source {i} (in-memory records)"
            records = [validate_record(r, f"{name} row {j}") for j, r in enumerate(data)]
        if not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight < 0:
            raise DataError(f"{name}: mixing weight: expected a finite number >= 0, got {weight!r}")
        ids = encode_prompts(records, tokenizer, chat_template=chat_template)
        keep = [j for j, p in enumerate(ids)
                if self.max_prompt_tokens is None or len(p) <= self.max_prompt_tokens]
        if weight > 0 and not keep:
            raise DataError(f"{name}: no prompts left ({len(records)} read, all longer than "
                            f"max_prompt_tokens={self.max_prompt_tokens}) but its weight is {weight}")
        return _Source(name, float(weight), [records[j] for j in keep], [ids[j] for j in keep],
                       len(records) - len(keep))

    @property
    def domains(self) -> set[str]:
        """The reward domains of the records (what the scorer must be able to score)."""
        return {r["domain"] for src in self.sources for r in src.records}

    @property
    def num_dropped(self) -> int:
        return sum(s.num_dropped for s in self.sources)

    @property
    def num_dropped_by_source(self) -> dict[str, int]:
        return {s.name: s.num_dropped for s in self.sources}

    @property
    def sizes(self) -> list[int]:
        return [len(s.records) for s in self.sources]

    def __len__(self) -> int:
        return sum(self.sizes)

    def all_prompts(self, max_per_source: int | None = None) -> list[Prompt]:
        """Every kept prompt (at most the first `max_per_source` of each source), source by
        source in file order: the problems of a validation pass."""
        return [Prompt(rec, ids, si, j) for si, s in enumerate(self.sources)
                for j, (rec, ids) in enumerate(zip(s.records[:max_per_source],
                                                   s.prompt_ids[:max_per_source]))]

    def iterator(self) -> "PromptIterator":
        return PromptIterator(self)


class PromptIterator:
    """Endless, deterministic stream of prompts mixed by weight (see the module docstring).
    Refills (dynamic sampling asking for more prompts) simply call next_batch again."""

    STATE_VERSION = 1

    def __init__(self, dataset: PromptDataset):
        self.dataset = dataset
        self.num_drawn = 0
        self._epochs = [0] * len(dataset.sources)
        self._positions = [0] * len(dataset.sources)
        self._orders: dict[int, np.ndarray] = {}

    def _source_of_draw(self, k: int) -> int:
        u = np.random.default_rng([self.dataset.seed, 0, k]).random()
        cdf = np.cumsum(self.dataset.probabilities)
        return int(min(np.searchsorted(cdf, u, side="right"), len(cdf) - 1))

    def _order(self, s: int) -> np.ndarray:
        if s not in self._orders:
            rng = np.random.default_rng([self.dataset.seed, 1, s, self._epochs[s]])
            self._orders[s] = rng.permutation(len(self.dataset.sources[s].records))
        return self._orders[s]

    def _next_of_source(self, s: int) -> Prompt:
        src = self.dataset.sources[s]
        if self._positions[s] >= len(src.records):
            self._epochs[s] += 1
            self._positions[s] = 0
            self._orders.pop(s, None)
        j = int(self._order(s)[self._positions[s]])
        self._positions[s] += 1
        return Prompt(src.records[j], src.prompt_ids[j], s, j)

    def next_batch(self, n: int) -> list[Prompt]:
        """The next `n` prompts."""
        if n < 0:
            raise ValueError(f"next_batch: n must be >= 0, got {n}")
        batch = []
        for _ in range(n):
            batch.append(self._next_of_source(self._source_of_draw(self.num_drawn)))
            self.num_drawn += 1
        return batch

    def state_dict(self) -> dict:
        """JSON-serialisable position of the stream (saved in the checkpoint)."""
        return {
            "version": self.STATE_VERSION,
            "seed": self.dataset.seed,
            "num_drawn": self.num_drawn,
            "sources": [{"name": s.name, "size": len(s.records), "epoch": e, "position": p}
                        for s, e, p in zip(self.dataset.sources, self._epochs, self._positions)],
        }

    def load_state_dict(self, state: dict) -> None:
        """Resumes exactly where `state_dict()` was taken; the dataset must be the same
        (same seed, same sources with the same kept sizes), else DataError says what differs."""
        if not isinstance(state, dict) or state.get("version") != self.STATE_VERSION:
            raise DataError(f"prompt iterator state: expected a dict with version "
                            f"{self.STATE_VERSION}, got {state!r:.200}")
        if state["seed"] != self.dataset.seed:
            raise DataError(f"prompt iterator state: saved with seed {state['seed']}, "
                            f"dataset has seed {self.dataset.seed}")
        saved = state["sources"]
        if len(saved) != len(self.dataset.sources):
            raise DataError(f"prompt iterator state: saved with {len(saved)} sources, "
                            f"dataset has {len(self.dataset.sources)}")
        for s, src in zip(saved, self.dataset.sources):
            if s["size"] != len(src.records):
                raise DataError(f"prompt iterator state: source {src.name} had {s['size']} "
                                f"prompts when saved, now has {len(src.records)}")
        self.num_drawn = int(state["num_drawn"])
        self._epochs = [int(s["epoch"]) for s in saved]
        self._positions = [int(s["position"]) for s in saved]
        self._orders = {}
