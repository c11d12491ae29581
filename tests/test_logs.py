"""The journal tells a call's story: the effective configuration at start, then one structured line per decision
with the numbers that drove it (real daemon, its JSON log lines)."""

from __future__ import annotations

import asyncio
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


def test_a_turns_lines_are_written_after_it_in_order() -> None:
    """What a loop callback logs reaches the stream after the callback (its answer goes first), in one write and
    in order; outside a running loop a line is written at once, after those still pending; flush() writes what a
    loop that stopped left pending."""
    class Counted(io.StringIO):
        writes = 0

        def write(self, text: str) -> int:
            self.writes += 1
            return super().write(text)

    stream = Counted()
    handler = logs.TurnHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("agentd.test_logs.turns")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    seen: list[str] = []

    def callback() -> None:
        logger.info("first", extra={"n": 1})
        logger.info("second", extra={"n": 2})
        seen.append(stream.getvalue())  # nothing yet
        stream.write("answer\n")

    def last() -> None:
        logger.info("left pending")
        loop.stop()

    loop = asyncio.new_event_loop()
    try:
        loop.call_soon(callback)
        loop.call_soon(lambda: seen.append(stream.getvalue()))  # same turn: still nothing of the callback's
        loop.run_until_complete(asyncio.sleep(0.01))
        assert seen == ["", "answer\n"] and stream.writes == 2  # the answer, then both lines
        written = stream.getvalue().splitlines()
        assert written[0] == "answer" and [json.loads(line)["msg"] for line in written[1:]] == ["first", "second"]
        loop.call_soon(last)
        loop.run_forever()  # stops in the turn that logged: its write never ran
        assert "left pending" not in stream.getvalue()
        logger.info("outside the loop")
        assert [json.loads(line)["msg"] for line in stream.getvalue().splitlines()[3:]] == [
            "left pending", "outside the loop"]
        loop.call_soon(lambda: logger.info("at exit"))
        loop.call_soon(loop.stop)
        loop.run_forever()
        handler.flush()
        assert json.loads(stream.getvalue().splitlines()[-1])["msg"] == "at exit"
    finally:
        loop.close()
        logger.removeHandler(handler)
