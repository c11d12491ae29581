"""/proc about one process: its children, the anonymous memory it has resident, its oom_score_adj."""

from __future__ import annotations

import os


def children(pid: int) -> list[int]:
    """The current children of every thread of a process; [] once it is gone."""
    found: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return found
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found.extend(int(child) for child in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
    return found


def anon_resident_bytes(pid: int) -> int:
    """RssAnon of a process (its private memory in RAM); -1 if it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024  # kB
    except (FileNotFoundError, ProcessLookupError):
        pass
    return -1


def set_oom_score_adj(pid: int, value: int) -> None:
    """How eagerly the kernel's OOM killer picks the process (-1000..1000); children inherit it at fork."""
    fd = os.open(f"/proc/{pid}/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)  # raw: once per placed process
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def oom_score_adj(pid: int) -> int:
    with open(f"/proc/{pid}/oom_score_adj", "rb") as f:
        return int(f.read())
