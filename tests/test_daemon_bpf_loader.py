"""The daemon's BPF programs: loaded at start and shown in GetStatus and metrics, gone after a stop or a
SIGKILL (checked with bpftool); with the objects missing the daemon runs without them and says so."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from bpf_support import requires_root, wait_gone
from support import AGENTCTL, Daemon, create_session, scrape, spawn_in, value

from agentd.api.gen import agentd_pb2 as pb
from agentd.kernel.bpf import OBJECTS_DIR_ENV

pytestmark = requires_root
PROGRAMS = {"on_fork", "on_exec", "on_exit", "connect4", "connect6", "sendmsg4", "sendmsg6"}


def agentctl_status(daemon: Daemon) -> str:
    shown = subprocess.run([*AGENTCTL, "status"], capture_output=True, text=True, env=daemon.env(), timeout=60)
    assert shown.returncode == 0, shown.stderr
    return shown.stdout


def loaded(kind: str) -> dict[int, str]:
    """Loaded BPF objects of a kind (prog, link) per bpftool: name (programs) or type (links) by id."""
    listing = subprocess.run(["bpftool", "-j", kind, "list"], check=True, capture_output=True, text=True)
    return {entry["id"]: entry.get("name", entry.get("type", "")) for entry in json.loads(listing.stdout or "[]")}


def test_programs_live_exactly_as_long_as_the_daemon(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    for stop in (d.stop, d.kill9):
        before = {kind: set(loaded(kind)) for kind in ("prog", "link")}
        d.start()
        programs = {i: name for i, name in loaded("prog").items() if i not in before["prog"]}
        links = set(loaded("link")) - before["link"]
        assert set(programs.values()) >= PROGRAMS and len(links) >= len(PROGRAMS)
        with d.admin() as admin:
            status = admin.call("GetStatus", pb.GetStatusRequest())
        assert (status.bpf_lifecycle, status.bpf_network, status.auto_capture) == (True, True, True)
        assert list(status.bpf_errors) == []
        assert "BPF: lifecycle yes; network policy yes; auto-capture on\n" in agentctl_status(d)
        text = scrape(d)
        assert value(text, 'agentd_bpf_enabled{program="lifecycle"}') == 1
        assert value(text, 'agentd_bpf_enabled{program="netpolicy"}') == 1
        stop()
        assert wait_gone("link", links) == set()
        assert wait_gone("prog", set(programs)) == set()


def test_missing_objects_leave_the_daemon_running_without_bpf(
    daemon_factory: Callable[..., Daemon], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(OBJECTS_DIR_ENV, str(tmp_path / "no-objects"))
    d = daemon_factory().start()
    with d.admin() as admin:
        status = admin.call("GetStatus", pb.GetStatusRequest())
        assert (status.bpf_lifecycle, status.bpf_network, status.auto_capture) == (False, False, False)
        lifecycle, netpolicy = status.bpf_errors
        assert "lifecycle.bpf.o" in lifecycle and "make -C bpf" in lifecycle
        assert "netpolicy.bpf.o" in netpolicy and "network intent NONE is not enforced" in netpolicy
        sid, _ = create_session(admin)
        # No kernel exit status: without a report the call ends EXITED; NONE is stored, reported not enforced.
        begun = admin.begin(pb.Intent(tool="exit", network=pb.NETWORK_NONE), sid, report_exit=False)
        assert "network" in begun.limits.not_enforced
        os.waitpid(admin.spawn(begun, ["sh", "-c", "exit 3"]), 0)
        result = admin.wait(begun.call_id, timeout=10)
        assert (result.outcome, result.has_exit_status, result.forks) == (pb.OUTCOME_EXITED, False, -1)
        # Nothing is captured.
        agent = spawn_in(d.session_path(sid) / "agent", ["bash", "-c", "exit 0"])
        assert agent.wait(10) == 0
        assert [r.call_id for r in admin.call("ListToolCalls", pb.ListToolCallsRequest(session_id=sid)).finished] == [
            begun.call_id
        ]
    shown = agentctl_status(d)
    assert "BPF: lifecycle no; network policy no; auto-capture off\n" in shown
    assert "BPF error: BPF program lifecycle not loaded" in shown
    text = scrape(d)
    assert value(text, 'agentd_bpf_enabled{program="lifecycle"}') == 0
    assert "agentd_session_process_events_total" not in text
    errors = [json.loads(line) for line in d.log.read_text().splitlines() if '"level": "error"' in line]
    assert [e["msg"].split(":")[0] for e in errors] == [
        "BPF program lifecycle not loaded (exit status from the kernel, process counters and auto-capture)",
        "BPF program netpolicy not loaded (network intent NONE is not enforced)",
    ]
