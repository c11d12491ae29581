"""The records file: appended and synced, reloaded after a restart, rotated by size."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from damage import damaged, json_values, places
from history import session_of, write_history
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import Daemon

from agentd.api import convert
from agentd.core import records
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


@pytest.mark.parametrize("chunk", [97, records.READ_CHUNK_BYTES])
def test_records_beyond_memory_are_found_in_both_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       chunk: int) -> None:
    """After a restart nothing is parsed ahead: every record still kept (current or rotated file) is found by
    its id, ListToolCalls looks through the newest `keep` records, by session too. (Read back in chunks smaller
    than a line as well, to cross every line boundary.)"""
    monkeypatch.setattr(records, "READ_CHUNK_BYTES", chunk)
    path = tmp_path / "records.jsonl"
    store = RecordStore(path, 200_000, 100)
    for i in range(700):
        store.append(result(f"c{i}", f"s{i % 3}"))
        if i % 9 == 0:
            store.write_pending()
    store.close()
    kept = [json.loads(line)["call_id"] for name in ("records.jsonl.1", "records.jsonl")
            for line in (tmp_path / name).read_text().splitlines()]
    assert 300 < len(kept) < 700  # rotated once at least: the oldest are gone, some are in .1 only
    again = RecordStore(path, 200_000, 100)
    try:
        for i in range(700):
            found = again.get(f"c{i}")
            assert (found is not None) == (f"c{i}" in kept)
            assert found is None or found == result(f"c{i}", f"s{i % 3}")
        assert [r.call_id for r in again.recent(None, 1000)] == kept[::-1][:100]
        assert [r.call_id for r in again.recent("s1", 10)] == [c for c in kept[::-1][:100] if int(c[1:]) % 3 == 1][:10]
        assert again.get("never") is None
    finally:
        again.close()


def test_opening_a_large_history_parses_nothing(tmp_path: Path) -> None:
    """100k records (120 MB): the first open indexes them once (an upgrade), every later open only checks the
    index. The bench (bench/restart.py) measures the daemon; this bound is generous."""
    path = tmp_path / "records.jsonl"
    ids = write_history(path, 100_000, 256 << 20)
    RecordStore(path, 256 << 20, 10_000).close()
    began = time.monotonic()
    store = RecordStore(path, 256 << 20, 10_000)
    opened = time.monotonic() - began
    try:
        assert opened < 1.0, f"opening took {opened:.2f} s"
        assert [store.get(i) is not None for i in (ids[0], ids[50_000], ids[-1])] == [True, True, True]
        listed = store.recent(session_of(5, 16), 20)
        assert [r.call_id for r in listed] == [i for n, i in enumerate(ids) if n % 16 == 5][::-1][:20]
    finally:
        store.close()


def test_the_index_is_rebuilt_when_missing_damaged_or_foreign(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    index = tmp_path / "records.jsonl.idx"
    store = RecordStore(path, 1 << 20, 100)
    for i in range(300):
        store.append(result(f"c{i}"))
    store.close()
    for spoil in (index.unlink, lambda: index.write_bytes(b"\0" * 1000),
                  lambda: index.write_bytes(index.read_bytes()[:-20]),
                  lambda: shutil.copy(path, tmp_path / "copy") and os.replace(tmp_path / "copy", path)):
        spoil()  # the last one: a file replaced by hand, under an index naming another inode
        again = RecordStore(path, 1 << 20, 100)
        try:
            assert all(again.get(f"c{i}") == result(f"c{i}") for i in range(300))
        finally:
            again.close()


def test_a_host_crash_that_cut_the_records_behind_the_index(tmp_path: Path) -> None:
    """The index is not flushed: after a host crash it may name lines the records file lost, or miss lines it
    kept. Lost lines are not found, kept ones are, a cut line stays apart from the next record."""
    path = tmp_path / "records.jsonl"
    store = RecordStore(path, 1 << 20, 100)
    for i in range(200):
        store.append(result(f"c{i}"))
    store.close()
    data = path.read_bytes()
    cut = data.rindex(b"\n", 0, len(data) - 1) - 30  # c198 cut in the middle, c199 lost
    path.write_bytes(data[:cut])
    again = RecordStore(path, 1 << 20, 100)
    again.append(result("after"))
    again.close()
    third = RecordStore(path, 1 << 20, 100)
    try:
        assert third.get("c197") == result("c197")
        assert third.get("c198") is None and third.get("c199") is None
        assert third.get("after") == result("after")
        assert [r.call_id for r in third.recent(None, 3)] == ["after", "c197", "c196"]
    finally:
        third.close()


def test_rotation_leaves_the_flush_to_the_syncer(tmp_path: Path) -> None:
    """Rotating a file full of unflushed lines returns at once; the flush happens behind it. Measured against
    a flush of as much data on the same disk."""
    block = (json.dumps(result("bulk").to_json()).encode() + b"\n") * 4096
    size = (256 << 20) // len(block) * len(block)
    reference = tmp_path / "reference"
    with reference.open("wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        began = time.monotonic()
        os.fdatasync(f.fileno())
        flush = time.monotonic() - began
    reference.unlink()
    if flush < 0.05:
        pytest.skip(f"flushing {size >> 20} MiB takes {flush * 1e3:.0f} ms here: too fast to tell")
    path = tmp_path / "records.jsonl"
    store = RecordStore(path, size, 100)
    try:
        with path.open("ab") as f:  # lines written but not flushed yet (by another writer: the syncer is idle)
            for _ in range(size // len(block)):
                f.write(block)
        store.append(result("rotates"))
        began = time.monotonic()
        store.write_pending()
        rotated = time.monotonic() - began
        assert (tmp_path / "records.jsonl.1").stat().st_size == size
        assert rotated < flush / 4, f"rotation took {rotated * 1e3:.0f} ms, a flush {flush * 1e3:.0f} ms"
        assert store.get("rotates") == result("rotates")
    finally:
        store.close()


def test_the_test_reader_takes_only_complete_lines_while_agentd_writes_one(tmp_path: Path) -> None:
    """tests/support.py's reader of the records file (found flaky: a JSON decode error on the line agentd was
    still writing): a line counts once its newline is there."""
    daemon = Daemon(tmp_path)
    daemon.records.parent.mkdir(parents=True)
    daemon.records.write_text('{"call_id": "a"}\n{"call_id": "b", "sess')
    assert daemon.records_lines() == ['{"call_id": "a"}']
    with daemon.records.open("a") as f:
        f.write('ion_id": "s"}\n')
    assert [json.loads(line)["call_id"] for line in daemon.records_lines()] == ["a", "b"]


def test_a_line_encoded_by_the_caller_is_written_for_that_result_only(tmp_path: Path) -> None:
    """The reaper encodes a result once, for its label and its line; a later result of the same id (no encoding
    given) is written as itself, not with the earlier bytes."""
    path = tmp_path / "records.jsonl"
    store = RecordStore(path, 1 << 20, 100)
    first = result("c1")
    second = dataclasses.replace(first, feedback="another")
    store.append(first, records.encode_result(first))
    store.append(second)
    store.close()
    assert path.read_bytes().splitlines() == [records.encode_result(first), records.encode_result(second)]
    assert json.loads(records.encode_result(first)) == first.to_json()
