"""The journal tells a call's story: the effective configuration at start, then one structured line per decision
with the numbers that drove it (real daemon, its JSON log lines)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

from support import Daemon, create_session, wait_for

from agentd import logs
from agentd.core.results import Outcome


def lines(daemon: Daemon) -> list[dict[str, Any]]:
    out = []
    for raw in daemon.log.read_text().splitlines():
        try:
            out.append(json.loads(raw))
        except ValueError:
            continue  # not ours (e.g. a library writing to stderr)
    return out


def test_the_journal_tells_a_calls_story(daemon: Daemon) -> None:
    config = [line for line in lines(daemon) if line["msg"] == "effective configuration"]
    assert len(config) >= 1
    effective = config[-1]["config"]
    assert isinstance(effective, dict) and effective["limits.memory_ceiling"] > 0
    assert effective["api.join_socket"] == str(daemon.join_socket)
    with daemon.admin() as admin:
        sid, _ = create_session(admin, "story", memory_budget_bytes=512 << 20)
        done = admin.run(["sh", "-c", "exit 3"], sid, memory_max_bytes=1 << 30, timeout_seconds=30)
        call = done.result.call_id
        wait_for(lambda: any(line.get("call") == call and line["msg"] == "call finished" for line in lines(daemon)))
        story = [line for line in lines(daemon) if line.get("call") == call or line.get("session") == sid]
    created = next(line for line in story if line["msg"] == "session created")
    assert created["memory_budget"] == 512 << 20
    begun = next(line for line in story if line["msg"] == "call begun")
    assert begun["declared_memory_max"] == 1 << 30 and begun["memory_max"] == 512 << 20
    assert begun["capped"] == "memory_max" and begun["timeout_s"] == 30
    finished = next(line for line in story if line["msg"] == "call finished")
    assert (finished["outcome"], finished["exit_code"]) == ("FAILED", 3)
    assert finished["duration_s"] >= 0 and "memory_peak" in finished


def test_a_line_holds_its_fields_as_json_values() -> None:
    """The formatter's fast path keeps what a line shows: plain values as they are (an IntEnum as its number),
    anything else as its str(), the exception's traceback; not what another handler's formatter added to the
    record before (message, asctime)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    plain = logging.StreamHandler(io.StringIO())
    plain.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger = logging.getLogger("agentd.test_logs")
    logger.addHandler(plain)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("a %s line", "formatted", extra={"path": Path("/a/b"), "outcome": Outcome.OOM_KILLED,
                                                       "none": None, "map": {"k": [1, 2]}, "ok": True})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed", extra={"call": "c1"})
    finally:
        logger.removeHandler(handler)
        logger.removeHandler(plain)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first.pop("ts") > 0 and second.pop("ts") > 0
    assert first == {"level": "warning", "logger": "agentd.test_logs", "msg": "a formatted line", "path": "/a/b",
                     "outcome": int(Outcome.OOM_KILLED), "none": None, "map": {"k": [1, 2]}, "ok": True}
    assert second["call"] == "c1" and "ValueError: boom" in second.pop("exc")
    assert second == {"level": "error", "logger": "agentd.test_logs", "msg": "failed", "call": "c1"}
