"""Read back what agentd wrote as JSON (records, cgroup labels) into its dataclasses, strictly.

Every value is checked against the field's type (and, for integers, its range): a line edited by hand, cut by a
crash or written by another version is refused where it is read (TypeError/ValueError, which the readers log
and skip) instead of failing, later and repeatedly, whoever serves it.
"""

from __future__ import annotations

import dataclasses
import types
from enum import Enum
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")
INT64 = (-(1 << 63), (1 << 63) - 1)
_SCHEMAS: dict[type, tuple[dict[str, Any], frozenset[str]]] = {}
_SCALARS = (bool, int, float, str)


def int_ranges(**ranges: tuple[int, int] | type[Enum]) -> dict[str, tuple[int, int]]:
    """Narrower ranges than int64 for a dataclass's integer fields (`JSON_RANGES`): a pair, or an IntEnum
    whose values the field holds."""
    return {
        name: (min(r).value, max(r).value) if isinstance(r, type) else r  # type: ignore[type-var]
        for name, r in ranges.items()
    }


def decode(cls: type[T], data: object) -> T:
    """`cls` built from `data` (a JSON object); raises TypeError or ValueError naming the field at fault."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    hints, fields = _schema(cls)
    ranges: dict[str, tuple[int, int]] = getattr(cls, "JSON_RANGES", {})
    values = {}
    for name, value in data.items():
        if name not in fields:
            raise TypeError(f"{cls.__name__}: unknown field {name!r}")
        values[name] = _value(f"{cls.__name__}.{name}", hints[name], value, ranges.get(name, INT64))
    return cls(**values)


def _schema(cls: type) -> tuple[dict[str, Any], frozenset[str]]:
    """A dataclass's field types and names, resolved once: resolving the annotations costs ~50 us per class
    and call, most of a record's decoding."""
    found = _SCHEMAS.get(cls)
    if found is None:
        found = _SCHEMAS[cls] = (get_type_hints(cls), frozenset(f.name for f in dataclasses.fields(cls)))
    return found


def _value(where: str, hint: Any, value: object, bounds: tuple[int, int]) -> Any:
    if hint in _SCALARS:  # most fields: checked before the costlier generic forms
        return _scalar(where, hint, value, bounds)
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):  # X | None
        if value is None and type(None) in args:
            return None
        (hint,) = (a for a in args if a is not type(None))
        origin, args = get_origin(hint), get_args(hint)
    if origin is tuple:
        if not isinstance(value, list):
            raise TypeError(f"{where}: expected a list")
        return tuple(_value(where, args[0], item, bounds) for item in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected an object")
        return {_value(where, args[0], k, bounds): _value(where, args[1], v, bounds) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return decode(hint, value)  # type: ignore[arg-type]
    if isinstance(hint, type) and issubclass(hint, Enum):
        if not isinstance(value, str) or value not in hint.__members__:
            raise ValueError(f"{where}: not a {hint.__name__}: {value!r}")
        return hint[value]
    if hint in _SCALARS:
        return _scalar(where, hint, value, bounds)
    raise TypeError(f"{where}: cannot decode a {hint!r}")


def _scalar(where: str, hint: Any, value: object, bounds: tuple[int, int]) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{where}: expected true or false")
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{where}: expected an integer")
        if not bounds[0] <= value <= bounds[1]:
            raise ValueError(f"{where}: {value} is out of range")
        return value
    if hint is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise TypeError(f"{where}: expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(f"{where}: expected a string")
        return value
    raise TypeError(f"{where}: cannot decode a {hint!r}")
