"""The libbpf loader on this host's kernel: clear errors for missing or broken objects, nothing left loaded
or attached after close (checked with bpftool), ring-buffer callback errors surface to the caller."""

from __future__ import annotations

import errno
import os
import select
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from bpf_support import Cgroups, bpf_ids, popen_in_cgroup, requires_root, wait_gone

from agentd.kernel.bpf import OBJECTS_DIR_ENV, cgroup_id, object_path
from agentd.kernel.bpf.libbpf import BpfError, BpfObject
from agentd.kernel.bpf.lifecycle import CgroupKind, LifecycleTracker
from agentd.kernel.bpf.netpolicy import NetworkPolicy

pytestmark = requires_root
KINDS = ("prog", "map", "link")


@pytest.fixture
def cgroups() -> Iterator[Cgroups]:
    with Cgroups() as made:
        yield made


def test_missing_object_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OBJECTS_DIR_ENV, str(tmp_path))
    assert object_path("lifecycle") == tmp_path / "lifecycle.bpf.o"
    with pytest.raises(BpfError) as raised:
        LifecycleTracker()
    assert raised.value.errno == errno.ENOENT
    assert str(tmp_path / "lifecycle.bpf.o") in str(raised.value) and "make -C bpf" in str(raised.value)


def test_broken_object_is_a_clear_error(tmp_path: Path) -> None:
    broken = tmp_path / "netpolicy.bpf.o"
    broken.write_bytes(b"not an ELF file")
    with pytest.raises(BpfError, match=r"open failed for .*netpolicy\.bpf\.o") as raised:
        NetworkPolicy(tmp_path, path=broken)
    assert raised.value.errno != 0


def test_close_leaves_nothing_loaded_or_attached(cgroups: Cgroups) -> None:
    before = {kind: bpf_ids(kind) for kind in KINDS}
    with LifecycleTracker(), NetworkPolicy(cgroups.make()):
        ours = {kind: bpf_ids(kind) - before[kind] for kind in KINDS}
    assert (len(ours["prog"]), len(ours["link"])) == (3 + 4, 3 + 4)
    assert len(ours["map"]) >= 3 + 2
    for kind in KINDS:
        assert wait_gone(kind, ours[kind]) == set(), kind


def test_failed_attach_releases_the_object(tmp_path: Path) -> None:
    before = bpf_ids("prog")
    with pytest.raises(BpfError, match=f"attach at {tmp_path} failed for netpolicy.bpf.o: connect4"):
        NetworkPolicy(tmp_path)  # not a cgroup directory
    assert wait_gone("prog", bpf_ids("prog") - before) == set()


def test_use_after_close_is_an_error() -> None:
    tracker = LifecycleTracker()
    tracker.close()
    tracker.close()
    with pytest.raises(BpfError) as raised:
        tracker.counters(1)
    assert raised.value.errno == errno.EBADF


def test_ring_buffer_callback_errors_reach_the_consumer(cgroups: Cgroups) -> None:
    class Boom(Exception):
        pass

    def explode(record: bytes) -> None:
        raise Boom(len(record))

    cgroup = cgroups.make()
    with BpfObject(object_path("lifecycle")) as obj:
        ring = obj.ring_buffer("events", explode)
        agent_leaf = struct.pack("<I28x", CgroupKind.AGENT_LEAF)  # its execs wake the consumer
        obj.map("managed", 8, 32).update(struct.pack("<Q", cgroup_id(cgroup)), agent_leaf)
        obj.attach("on_exec")
        process = popen_in_cgroup(cgroup, ["/bin/true"])
        process.wait(timeout=10)
        assert select.select([ring.epoll_fd()], [], [], 5)[0]
        with pytest.raises(Boom):
            ring.consume()
        assert ring.consume() == 0  # the record that raised was consumed
        with pytest.raises(BpfError, match="check map"):
            obj.map("managed", 8, 16)


def test_objects_dir_defaults_to_the_source_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(OBJECTS_DIR_ENV, raising=False)
    assert (
        object_path("lifecycle") == Path(__file__).resolve().parents[1] / "bpf" / "build" / "lifecycle.bpf.o"
    )
    assert os.path.exists(object_path("lifecycle")), "build the objects first: make -C bpf"
