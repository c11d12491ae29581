"""Human sizes ('512M', '2G', '1.5GiB') to bytes and back."""

from __future__ import annotations

import math
import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(value: str | int) -> int:
    """Bytes from an int or a string with an optional binary suffix (K, M, G, T, P; 'iB'/'B' allowed)."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"negative size: {value}")
        return value
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"not a size: {value!r} (examples: 4096, 512M, 2G, 1.5GiB)")
    number = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if not math.isfinite(number):
        raise ValueError(f"not a size: {value!r}")
    return int(number)


def format_size(nbytes: int) -> str:
    """Short human form: 1536 MiB -> '1.5 GiB'."""
    if nbytes < 0:
        return "n/a"
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" or value >= 100 else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
