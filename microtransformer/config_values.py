"""Config values: the one conversion of a value to its field's type, and the range checks.

Pure functions on Python types, with no knowledge of the config's sections: `convert` brings
command-line text, a TOML / JSON value or a Python value to a field's type (`config.field_value`
names the key when it fails); `normalise_fields` applies it to a dataclass built from Python;
`check_int` / `check_float` collect a section's range problems as one-line messages.
"""

from __future__ import annotations

import contextlib
import math
import types
import typing
from dataclasses import fields
from typing import Any

_NONE_WORDS = ("none", "null", "")
_TRUE_WORDS = ("true", "1", "yes", "on")
_FALSE_WORDS = ("false", "0", "no", "off")


def convert(typ: Any, value: Any, *, one_item: bool = False, text: bool = True) -> Any:
    """`value` as type `typ`, or ValueError saying what was expected.

    `one_item`: text for a variable-length tuple is one element, never split (a file name may
    hold a comma); a TOML list is the whole tuple. `text=False` (values from Python) parses no
    text: a string where a number or a bool belongs is an error.
    """
    if not text and isinstance(value, str):
        if typ is str or str in typing.get_args(typ):
            return value
        raise ValueError(f"is text; expected {type_name(typ)}")
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        optional = type(None) in args
        inner = [a for a in args if a is not type(None)]
        if value is None or (optional and isinstance(value, str)
                             and value.strip().lower() in _NONE_WORDS):
            if optional:
                return None
            raise ValueError(f"none is not allowed; give a value of type {type_name(typ)}")
        if isinstance(value, str) and str in inner:  # e.g. int | str: a number if it parses
            for other in inner:
                if other is not str:
                    with contextlib.suppress(ValueError):
                        return convert(other, value)
            return value
        return convert(inner[0], value, one_item=one_item, text=text)
    if value is None:
        raise ValueError(f"none is not allowed; give a value of type {type_name(typ)}")
    if origin is tuple:
        variable = len(args) == 2 and args[1] is Ellipsis
        if isinstance(value, str):
            if variable:
                return (convert(args[0], value),) if value else ()
            value = [p.strip() for p in value.strip().strip("()[]").split(",") if p.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"has type {type(value).__name__}; expected a list")
        elem_types = [args[0]] * len(value) if variable else list(args)
        if len(elem_types) != len(value):
            raise ValueError(f"expected {len(elem_types)} comma-separated values, e.g. 0.9,0.95")
        return tuple(convert(t, v, text=text) for t, v in zip(elem_types, value, strict=True))
    if isinstance(value, str) and typ is not str:
        return _parse_text(typ, value)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = (typ is bool and isinstance(value, bool)) or (
        typ in (int, float) and isinstance(value, typ) and not isinstance(value, bool)
    ) or (typ is str and isinstance(value, str))
    if not ok:
        raise ValueError(f"has type {type(value).__name__}; expected {type_name(typ)}")
    return value


def _parse_text(typ: Any, text: str) -> Any:
    """A scalar field's value from text."""
    if typ is bool:
        low = text.strip().lower()
        if low in _TRUE_WORDS or low in _FALSE_WORDS:
            return low in _TRUE_WORDS
        raise ValueError("expected a boolean (true/false)")
    if typ is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("expected an integer, e.g. 6") from None
    if typ is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError("expected a number, e.g. 3e-4") from None
    raise ValueError(f"cannot parse a value of type {type_name(typ)}")


def type_name(typ: Any) -> str:
    """A type's name for an error message ("int", "float | None")."""
    return getattr(typ, "__name__", str(typ))


def normalise_fields(obj: Any) -> None:
    """Bring the fields of a section built from Python to their types with `convert` (lists
    to tuples, ints to floats, text parsed); a value that does not convert is left for the
    section's validation to name."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        try:
            new = convert(hints[f.name], value, text=False)
        except ValueError:
            continue
        if new is not value:
            object.__setattr__(obj, f.name, new)


def is_number(v: Any) -> bool:
    """True for a finite int or float (a bool is not a number here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_int(problems: list[str], name: str, value: Any, *, minimum: int) -> None:
    """Append to `problems` why `value` is not an integer >= `minimum` (nothing when it is)."""
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"{name}={value!r} must be an integer >= {minimum}")
    elif value < minimum:
        problems.append(f"{name}={value} must be >= {minimum}")


def check_float(problems: list[str], name: str, value: Any, *, low: float | None = None,
                high: float | None = None, low_open: bool = False,
                high_open: bool = False) -> None:
    """Append to `problems` why `value` is not a finite number in the given range (bounds
    inclusive unless `low_open` / `high_open`); nothing when it is."""
    if not is_number(value):
        problems.append(f"{name}={value!r} must be a finite number")
        return
    lo_bad = low is not None and (value <= low if low_open else value < low)
    hi_bad = high is not None and (value >= high if high_open else value > high)
    if lo_bad or hi_bad:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        rng = f"{lo}, {hi}" if low is not None and high is not None else (
            f"{'>' if low_open else '>='} {low}" if low is not None else
            f"{'<' if high_open else '<='} {high}")
        problems.append(f"{name}={value} must be {'in ' if hi and lo else ''}{rng}")


def plain_int(v: Any) -> bool:
    """True for an int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)
