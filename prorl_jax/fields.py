"""Small frozen config dataclasses that validate themselves and name the run-config field.

Each component turns its part of the run config (a ConfigDict, configs/prorl.py) into one such
dataclass; the choices and ranges of its fields are declared on the fields, next to the code
that uses them:

    @dataclasses.dataclass(frozen=True)
    class UpdateConfig(Section):
        eps_low: float = field("loss.eps_low", 0.2, "in [0, 1)", lambda v: 0 <= v < 1)
        kl_kind: str = field("loss.kl_kind", "k3", choices=KL_KINDS)
        clip_c: Optional[float] = field("loss.clip_c", None, "> 1", lambda v: v > 1, off=0.0)

`UpdateConfig.from_config(cfg)` reads every field from its dotted key ("loss.eps_low"), and
construction checks every field: a bad value raises ConfigError("config.loss.eps_low=1.5:
expected in [0, 1)"). `off`: the run-config value that means "off" (None in the dataclass);
a None value is always accepted for such a field. `check()` adds the checks across fields.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Optional, Sequence

_NO_OFF = object()


class ConfigError(ValueError):
    """A config field has a bad value; the message names the field."""


def field(key: str, default: Any, expected: str = "", ok: Optional[Callable[[Any], bool]] = None,
          *, choices: Optional[Sequence[Any]] = None, off: Any = _NO_OFF) -> Any:
    """A dataclass field read from run-config `key`, checked by `choices` or by `ok` (a number
    for which ok(value) holds, described by `expected`)."""
    return dataclasses.field(default=default, metadata={
        "key": key, "expected": expected, "ok": ok, "choices": choices, "off": off})


def get_field(cfg: Any, dotted: str, *, where: str = "config") -> Any:
    """cfg["a"]["b"] for "a.b" (a ConfigDict or nested mappings); ConfigError when absent."""
    node = cfg
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            raise ConfigError(f"{where}: unknown field {dotted!r}")
        node = node[part]
    return node


def at_least(lo: float) -> tuple[str, Callable[[Any], bool]]:
    """(expected, ok) for a number >= lo."""
    return f">= {lo}", lambda v: v >= lo


def above(lo: float) -> tuple[str, Callable[[Any], bool]]:
    """(expected, ok) for a number > lo."""
    return f"> {lo}", lambda v: v > lo


def int_at_least(lo: int) -> tuple[str, Callable[[Any], bool]]:
    """(expected, ok) for an integer >= lo."""
    return f"an integer >= {lo}", lambda v: isinstance(v, numbers.Integral) and v >= lo


def check_value(key: str, value: Any, expected: str = "",
                ok: Optional[Callable[[Any], bool]] = None,
                choices: Optional[Sequence[Any]] = None) -> None:
    """Raises ConfigError("config.<key>=<value>: expected ...") unless the value passes."""
    if choices is not None:
        if value not in choices:
            raise ConfigError(f"config.{key}={value!r}: expected one of {list(choices)}")
    elif ok is not None:
        number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not number or not ok(value):
            raise ConfigError(f"config.{key}={value!r}: expected {expected}")


def parse_ints(spec: str, key: str) -> list[int]:
    """`"1,8,16"` -> [1, 8, 16]; ConfigError naming config.<key> otherwise."""
    try:
        return [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"config.{key}: expected comma-separated integers, got {spec!r}")


class Section:
    """Base of the config dataclasses: field checks at construction, `from_config`."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            m, value = f.metadata, getattr(self, f.name)
            if "key" not in m or (value is None and m["off"] is not _NO_OFF):
                continue
            check_value(m["key"], value, m["expected"], m["ok"], m["choices"])
        self.check()

    def check(self) -> None:
        """Checks across fields (raise ConfigError naming them); none by default."""

    @classmethod
    def from_config(cls, cfg: Any):
        """The dataclass of the run config `cfg`: each field from its dotted key (the config's
        `off` value becomes None, an int given for a float field a float)."""
        kw = {}
        for f in dataclasses.fields(cls):
            if "key" not in f.metadata:
                continue
            value = get_field(cfg, f.metadata["key"])
            off = f.metadata["off"]
            if off is not _NO_OFF and value == off and not isinstance(value, bool):
                value = None
            elif isinstance(f.default, float) and isinstance(value, int) \
                    and not isinstance(value, bool):
                value = float(value)
            kw[f.name] = value
        return cls(**kw)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)
