"""Argument checks shared by the loss functions: they run on static shapes and Python values
only (never on traced values), so every function stays jittable."""
from __future__ import annotations

import numbers
from typing import Sequence


def is_concrete_number(x) -> bool:
    """True for a plain Python/numpy number (not a traced or array value)."""
    return isinstance(x, numbers.Real)


def check_positive_int(name: str, value, meaning: str) -> int:
    """int(value), or ValueError naming `name` unless value is an integer >= 1 (numpy ints too)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int ({meaning}), got {value!r}")
    return int(value)


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Raise ValueError naming `name` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {list(choices)}")


def check_same_shape(**arrays) -> None:
    """Raise ValueError unless all named arrays have the same shape (None entries are skipped)."""
    shapes = {name: tuple(a.shape) for name, a in arrays.items() if a is not None}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"expected arrays of one shape [batch, time], got {listed}")


def check_ndim(name: str, array, ndim: int, layout: str) -> None:
    """Raise ValueError naming `name` unless `array` has `ndim` axes (`layout` as in docs)."""
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {layout} ({ndim} axes), got shape {tuple(array.shape)}")
