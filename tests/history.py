"""A records history of any size, written fast: lines in the exact shape of `Result.to_json()`, as agentd writes
them, with unique call ids. Used by the records tests and bench/restart.py."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from agentd.core.intents import Limits
from agentd.core.results import ExitStatus, Outcome, Result

ID_CHARS = 16  # new_call_id(): 8 random bytes in hex
PLACEHOLDER = "X" * ID_CHARS
FEEDBACK = (
    "The command exited with status 1. No agentd limit stopped it (peak memory 412.3 MiB); the failure is the "
    "command's own, so look at its output rather than at resources. It was throttled 3 times at its expected "
    "memory of 512 MiB (memory.high): declare more expected memory next time to run without the slowdown. "
    "Not enforced on this kernel: pids.max."
)


def sample(call_id: str, session: str, ended: float = 1.8e9) -> Result:
    """A record as agentd writes one for a failed pytest run (~1.2 KB as a line)."""
    return Result(
        call_id, session, "pytest", ("pytest", "-x", "-q", "tests/test_api.py", "-k", "restart and not slow"),
        Outcome.FAILED, ExitStatus(1, 0), 432_345_088, {"low": 0, "high": 3, "max": 0, "oom": 0, "oom_kill": 0},
        41.25, 6.5, 120_000, 37, 52.4, ended - 52.4, ended,
        Limits(536_870_912, 1_073_741_824, 100, 2000, 512, 600.0, 1), ("pids.max",), FEEDBACK, False, False,
        {"agent": "swe-bench", "task": "django__django-11099", "step": "17"}, "", 0, 212, None,
    )


def session_of(index: int, sessions: int) -> str:
    return f"session-{index % sessions:02d}"


def write_history(records: Path, count: int, max_bytes: int, sessions: int = 16) -> list[str]:
    """Write `count` records (record i belongs to session_of(i)) as a daemon with this records_max_bytes would
    have them: beyond max_bytes the older ones in <records>.1, filled up to max_bytes. Returns the call ids,
    oldest first."""
    parts = []
    for s in range(sessions):
        line = json.dumps(sample(PLACEHOLDER, session_of(s, sessions)).to_json(), separators=(",", ":")).encode()
        head, _, tail = line.partition(PLACEHOLDER.encode())
        parts.append((head, tail + b"\n"))
    line_bytes = len(parts[0][0]) + ID_CHARS + len(parts[0][1])
    rotated = min(count, max_bytes // line_bytes) if count * line_bytes > max_bytes else 0
    if count - rotated > max_bytes // line_bytes:
        raise ValueError(f"{count} records of {line_bytes} bytes do not fit in two files of {max_bytes} bytes")
    ids = [secrets.token_hex(ID_CHARS // 2) for _ in range(count)]
    records.parent.mkdir(parents=True, exist_ok=True)
    for path, first, last in ((records.with_name(records.name + ".1"), 0, rotated), (records, rotated, count)):
        if first == last:
            continue
        with path.open("wb") as f:
            for start in range(first, last, 20_000):
                chunk: list[bytes] = []
                for i in range(start, min(start + 20_000, last)):
                    head, tail = parts[i % sessions]
                    chunk += (head, ids[i].encode(), tail)
                f.write(b"".join(chunk))
    return ids
