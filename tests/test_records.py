"""The records file: appended and synced, reloaded after a restart, rotated by size."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from damage import damaged, json_values, places
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentd.api import convert
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


def test_full_disk_keeps_lines_pending(tmp_path: Path) -> None:
    """A write that fails (ENOSPC on a tiny tmpfs) loses nothing: the lines stay pending, no partial line is
    left, and the next write_pending() after space came back writes each line once."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        filler = mount / "filler"
        store = RecordStore(mount / "records.jsonl", 1 << 20, 1000)
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):
            while True:  # fill the file system
                os.write(fd, b"x" * 4096)
        os.close(fd)
        for i in range(20):
            store.append(result(f"c{i}"))
        with pytest.raises(OSError):
            store.write_pending()
        written = (mount / "records.jsonl").read_bytes()
        assert written == b"" or written.endswith(b"\n")
        filler.unlink()
        store.write_pending()
        store.close()
        ids = [json.loads(line)["call_id"] for line in (mount / "records.jsonl").read_text().splitlines()]
        assert sorted(ids) == sorted(f"c{i}" for i in range(20))
    finally:
        subprocess.run(["umount", str(mount)], check=True)


RECORD = result("good").to_json()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(place=st.sampled_from(places(RECORD)), value=json_values)
def test_a_damaged_record_is_skipped_or_served(tmp_path: Path, place: tuple[str, ...], value: Any) -> None:
    """A record line edited by hand or written by another version: skipped at load, or a result that agentd can
    still serve (ListToolCalls converts it); never an exception later."""
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(damaged(RECORD, place, value)) + "\n")
    store = RecordStore(path, 1 << 20, 10)
    try:
        for loaded in store.recent(None, 10):
            convert.result_to_pb(loaded)
    finally:
        store.close()
        path.unlink()
