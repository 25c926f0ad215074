"""The plumbing every converter shares: reading a source's rows, converting them with counts by
reason, writing records atomically, and the summary table.

A converter is `convert(row: dict, **options) -> record`. It raises
- `SkipRow(reason)` when the row is valid in its source but unusable here (an empty answer, a
  math row in the code set, an instruction the graders do not know): counted by `reason`;
- `DataError` when the row is malformed (a field missing or of the wrong type): the run stops
  with the file, row and field, unless skip_bad (then it is counted under "bad").
Every record written has been checked with `prorl_jax.data.validate_record`.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import glob
import json
import os
from typing import Any, Callable, Iterable, Sequence

from prorl_jax.data import DataError, read_rows, validate_record

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class SkipRow(Exception):
    """The row is valid in its source but not usable here; str(e) is the reason counted."""


@dataclasses.dataclass
class Report:
    """Counts of one conversion: rows read, records written, rows skipped or bad by reason."""
    source: str
    read: int = 0
    written: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    bad: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    out: str = ""

    def counts(self) -> dict[str, int]:
        return {"read": self.read, "written": self.written,
                "skipped": sum(self.skipped.values()), "bad": sum(self.bad.values())}


# ---------------------------------------------------------------- field helpers

def text_field(row: dict, name: str) -> str:
    """A non-empty string field; DataError naming it otherwise."""
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"field {name!r}: expected a non-empty string, got {value!r:.80}")
    return value


def first_key(row: dict, names: Sequence[str]) -> str | None:
    """The first of `names` present in `row`, compared case-insensitively; None if none is."""
    lower = {k.lower(): k for k in row}
    for name in names:
        if name.lower() in lower:
            return lower[name.lower()]
    return None


def json_value(value: Any, name: str) -> Any:
    """`value` parsed when it is a JSON string (pretty-printed or not), else as is."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"field {name!r}: not valid JSON ({e})") from None
    return value


def chat_messages(value: Any, name: str, *, keep_system: bool = True) -> list[dict]:
    """A chat list [{role, content}] (extra keys dropped; system messages kept or dropped)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"field {name!r}: expected a non-empty list of chat messages, "
                        f"got {value!r:.80}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) \
                or m.get("role") not in ("system", "user", "assistant"):
            raise DataError(f"field {name!r} message {j}: expected {{role: system|user|"
                            f"assistant, content: str}}, got {m!r:.80}")
        if keep_system or m["role"] != "system":
            out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" for m in out):
        raise DataError(f"field {name!r}: no user message")
    return out


# ---------------------------------------------------------------- reading

def _read_csv(path: str) -> list[tuple[str, dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [(f"{path} row {i}", row) for i, row in enumerate(csv.DictReader(f))]


def read_local(path: str, must_contain: str = "") -> list[tuple[str, Any]]:
    """(location, row) pairs of a .jsonl/.json/.parquet/.csv file, or of every such file in a
    directory whose path (below it) contains `must_contain`, recursively in name order (a
    `huggingface-cli download --local-dir` copy)."""
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                       if f.endswith(DATA_SUFFIXES) and os.path.isfile(f)
                       and must_contain in os.path.relpath(f, path))
        if not files:
            raise DataError(f"{path}: no {'/'.join(DATA_SUFFIXES)} files in this directory"
                            + (f" with {must_contain!r} in their path" if must_contain else ""))
        return [pair for f in files for pair in read_local(f)]
    if path.endswith(".csv"):
        if not os.path.exists(path):
            raise DataError(f"{path}: data file not found")
        return _read_csv(path)
    return read_rows(path)


def read_hub(name: str, config: str | None, split: str) -> Iterable[tuple[str, Any]]:
    """(location, row) pairs of a hub dataset through the `datasets` library (needs internet)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name}: no such local file or directory, and the `datasets` library "
                        f"(needed for hub names) is not installed") from None
    ds = datasets.load_dataset(name, config, split=split)
    return ((f"{name}[{split}] row {i}", row) for i, row in enumerate(ds))


def read_source(spec: str, *, split: str = "train", config: str | None = None,
                must_contain: str = "") -> Iterable[tuple[str, Any]]:
    """Rows of a local file/directory, else of the hub dataset named `spec`."""
    if os.path.exists(spec) or spec.endswith(DATA_SUFFIXES):
        return read_local(spec, must_contain)
    return read_hub(spec, config, split)


# ---------------------------------------------------------------- converting

def convert_rows(source: str, convert: Callable[..., dict], rows: Iterable[tuple[str, Any]], *,
                 limit: int | None = None, skip_bad: bool = False, **options
                 ) -> tuple[list[dict], Report]:
    """Converts and validates rows (see the module docstring); stops after `limit` written."""
    records, report = [], Report(source)
    for index, (where, row) in enumerate(rows):
        if limit is not None and report.written >= limit:
            break
        report.read += 1
        try:
            if not isinstance(row, dict):
                raise DataError(f"expected an object, got {type(row).__name__}")
            record = convert(row, **options)
            record.setdefault("id", f"{source}-{index}")
            record.setdefault("source", source)
            validate_record(record, where)
        except SkipRow as e:
            report.skipped[str(e)] += 1
            continue
        except DataError as e:
            msg = str(e) if str(e).startswith(where) else f"{where}: {e}"
            if not skip_bad:
                raise DataError(f"{msg} ({source} format)") from None
            report.bad[msg.removeprefix(f"{where}: ").split(":")[0]] += 1
            continue
        records.append(record)
        report.written += 1
    return records, report


def write_jsonl(records: Sequence[dict], path: str) -> None:
    """Writes one JSON record per line, atomically (a temporary file renamed into place)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def summary_table(reports: Sequence[Report]) -> str:
    """Rows read / written / skipped / bad per source, then each skip or bad reason's count."""
    lines = [f"{'source':16s} {'read':>8s} {'written':>8s} {'skipped':>8s} {'bad':>6s}  output"]
    for r in reports:
        c = r.counts()
        lines.append(f"{r.source:16s} {c['read']:8d} {c['written']:8d} {c['skipped']:8d} "
                     f"{c['bad']:6d}  {r.out}")
    for r in reports:
        for kind, counter in (("skipped", r.skipped), ("bad", r.bad)):
            for reason, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])):
                lines.append(f"  {r.source}: {kind} {n}: {reason}")
    return "\n".join(lines)
