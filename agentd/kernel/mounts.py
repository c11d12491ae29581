"""Locate the cgroup v2 hierarchy and translate between cgroup paths and filesystem paths."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

MOUNTINFO = Path("/proc/self/mountinfo")


class NoCgroup2Error(RuntimeError):
    """Raised when no cgroup2 filesystem is mounted."""


class Cgroup2Mount(NamedTuple):
    path: Path
    options: frozenset[str]  # the filesystem's (super block) options, e.g. nsdelegate, favordynmods


def cgroup2_mount(mountinfo: Path = MOUNTINFO) -> Cgroup2Mount:
    """The cgroup2 filesystem's mount point and options, read from mountinfo (never assumed)."""
    for line in mountinfo.read_text().splitlines():
        # Fields: id parent major:minor root mount-point options [optional...] - fstype source super-options
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fstype, _source, options = [*right.split(" "), "", ""][:3]
        fields = left.split(" ")
        if fstype == "cgroup2" and fields[3] == "/":
            return Cgroup2Mount(Path(_unescape(fields[4])), frozenset(options.split(",")))
    raise NoCgroup2Error("no cgroup2 filesystem in /proc/self/mountinfo; mount one (cgroup_no_v1 or unified)")


def own_cgroup(pid: int | str = "self") -> str:
    """The cgroup v2 path (relative to the cgroup2 mount, starting with '/') of a process."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hierarchy, _, path = line.split(":", 2)
        if hierarchy == "0":
            return path
    raise NoCgroup2Error(f"process {pid} has no cgroup v2 membership")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 0 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)
