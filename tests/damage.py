"""Hypothesis helpers for damaged JSON (records, cgroup labels): any value put at any place of a valid document."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import strategies as st

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(allow_nan=False),
              st.text(max_size=8)),
    lambda children: st.one_of(st.lists(children, max_size=2),
                               st.dictionaries(st.text(max_size=4), children, max_size=2)),
    max_leaves=3,
)


def places(document: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path in a JSON object, nested objects included."""
    found = [prefix] if prefix else []
    if isinstance(document, dict):
        for key, value in document.items():
            found += places(value, (*prefix, key))
    return found


def damaged(document: dict[str, Any], place: tuple[str, ...], value: Any) -> dict[str, Any]:
    """A copy of `document` with `value` at `place`."""
    copied = copy.deepcopy(document)
    parent = copied
    for key in place[:-1]:
        parent = parent[key]
    parent[place[-1]] = value
    return copied
