"""Pressure stall information: read cgroup pressure averages and probe whether PSI triggers work."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from agentd.kernel import cgroupfs

RESOURCES = ("memory", "cpu", "io")


@dataclass(frozen=True)
class Pressure:
    resource: str
    some_avg10: float
    full_avg10: float


def read_pressure(cgroup: Path, resource: str) -> Pressure | None:
    """avg10 of 'some' and 'full' from <cgroup>/<resource>.pressure; None if the file is absent."""
    try:
        text = (cgroup / f"{resource}.pressure").read_text()
    except OSError:
        return None
    values = {"some": 0.0, "full": 0.0}
    for line in text.splitlines():
        kind, *fields = line.split()
        for item in fields:
            key, _, value = item.partition("=")
            if key == "avg10" and kind in values:
                values[kind] = float(value)
    return Pressure(resource, values["some"], values["full"])


PROBE_TRIGGER = "some 150000 1000000"


def triggers_supported(cgroup: Path) -> bool:
    """True if a PSI trigger can be registered on this cgroup (fails with EINVAL/EOPNOTSUPP when PSI is off)."""
    try:
        fd = cgroupfs.pressure_trigger(cgroup, "memory", PROBE_TRIGGER)
    except cgroupfs.CgroupError:
        return False
    os.close(fd)
    return True


def some_stall_us(cgroup: Path, resource: str = "memory", files: cgroupfs.KeptFiles = cgroupfs.UNKEPT
                  ) -> int | None:
    """The cumulative 'some' stall (µs) of <cgroup>/<resource>.pressure; None without PSI (file absent, or PSI off:
    the kernel then reports zeros, which the caller cannot tell from no stall, hence the capability probe)."""
    try:
        text = files.read(cgroup, f"{resource}.pressure")
    except OSError:
        return None
    if text is None:
        return None
    for line in text.splitlines():
        kind, *fields = line.split()
        if kind == "some":
            for item in fields:
                key, _, value = item.partition("=")
                if key == "total":
                    return int(value)
    return None
