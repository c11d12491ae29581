"""The records file: appended and synced, reloaded after a restart, rotated by size."""

from __future__ import annotations

from pathlib import Path

from agentd.core.intents import Limits
from agentd.core.records import RecordStore
from agentd.core.results import ExitStatus, Outcome, Result

LIMITS = Limits(1, 2, 100, 0, 10, 60.0, 1)


def result(call_id: str, session: str = "s") -> Result:
    return Result(call_id, session, "tool", ("a", "b"), Outcome.FAILED, ExitStatus(3, 0), 100, {"high": 2}, 0.5,
                  0.25, 0, 4, 1.5, 10.0, 11.5, LIMITS, ("memory.max",), "feedback", False, False, {"k": "v"}, "")


def test_roundtrip_reload_and_query(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "records.jsonl", 1 << 20, 100)
    for i in range(5):
        store.append(result(f"c{i}", "a" if i % 2 else "b"))
    store.close()
    again = RecordStore(tmp_path / "records.jsonl", 1 << 20, 100)
    assert again.get("c3") == result("c3", "a")
    assert [r.call_id for r in again.recent("a", 10)] == ["c3", "c1"]
    assert [r.call_id for r in again.recent(None, 2)] == ["c4", "c3"]
    again.close()


def test_rotation_keeps_recent_records(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    store = RecordStore(path, 4096, 1000)
    for i in range(40):
        store.append(result(f"c{i}"))
    store.close()
    assert path.stat().st_size <= 4096 and path.with_name("records.jsonl.1").exists()
    again = RecordStore(path, 4096, 1000)
    assert again.get("c39") is not None
    assert len(again.recent(None, 1000)) < 40  # older than one rotation are gone from memory and disk
    again.close()


def test_unreadable_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    store = RecordStore(path, 1 << 20, 10)
    store.append(result("good"))
    store.close()
    with path.open("a") as f:
        f.write('{"truncated": \n')
    again = RecordStore(path, 1 << 20, 10)
    assert [r.call_id for r in again.recent(None, 10)] == ["good"]
    again.close()
