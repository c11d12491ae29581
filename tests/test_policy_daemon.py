"""The memory policy in a real daemon on this host: it runs without PSI and says so; its event stream is scoped
like every sandbox verb; [policy] keys are validated at start, naming the key. (What it does under pressure
needs the memory controller: tests/guest/test_policy_guest.py.)"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from support import AGENTCTL, Daemon, create_session, rpc_error

from agentd.api.gen import agentd_pb2 as pb


def test_status_says_how_the_policy_runs_here(daemon: Daemon) -> None:
    with daemon.admin() as admin:
        status = admin.call("GetStatus", pb.GetStatusRequest())
    assert status.policy.enabled
    assert status.policy.signals == ("psi+memory.events" if status.psi_available else "memory.events")
    assert [d.domain for d in status.policy.domains][:1] == ["sessions"]
    assert status.policy.domains[0].limit_bytes > 0 and status.policy.domains[0].level == "none"


def test_a_budgeted_session_is_a_domain_of_its_own(daemon: Daemon) -> None:
    with daemon.admin() as admin:
        sid, _ = create_session(admin, "budgeted", memory_budget_bytes=256 << 20)
        try:
            session = admin.call("GetSession", pb.GetSessionRequest(session_id=sid))
            assert session.pressure.domain == f"session:{sid}"
            assert session.pressure.limit_bytes == 256 << 20 and session.calls_held == 0
            domains = [d.domain for d in admin.call("GetStatus", pb.GetStatusRequest()).policy.domains]
            assert f"session:{sid}" in domains
        finally:
            admin.call("DeleteSession", pb.DeleteSessionRequest(session_id=sid, force=True))
        domains = [d.domain for d in admin.call("GetStatus", pb.GetStatusRequest()).policy.domains]
        assert f"session:{sid}" not in domains


def test_a_sandbox_watches_only_its_own_session(daemon: Daemon) -> None:
    with daemon.admin() as admin:
        mine, token = create_session(admin, "watch-mine")
        other, _ = create_session(admin, "watch-other")
        try:
            with daemon.sandbox(token) as sandbox:
                err = rpc_error(lambda: next(iter(sandbox.watch_policy(other))))
                assert err.code() == grpc.StatusCode.PERMISSION_DENIED
                stream = sandbox.watch_policy()
                threading.Timer(0.5, stream.cancel).start()
                with pytest.raises(grpc.RpcError) as idle:
                    next(iter(stream))  # nothing happens here: the stream stays open until cancelled
                assert idle.value.code() == grpc.StatusCode.CANCELLED
        finally:
            for sid in (mine, other):
                admin.call("DeleteSession", pb.DeleteSessionRequest(session_id=sid, force=True))


@pytest.mark.parametrize(("table", "named"), [
    ('tick_seconds = 0', "tick_seconds"),
    ('kill_reserve_min = 999999999999', "kill_reserve_min"),
    ('no_such_key = 1', "no_such_key"),
])
def test_policy_keys_are_checked_at_start(tmp_path: Path, table: str, named: str) -> None:
    config = tmp_path / "agentd.toml"
    config.write_text(f"[policy]\n{table}\n")
    run = subprocess.run([sys.executable, "-m", "agentd.daemon", "--config", str(config), "--check-config"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and f"[policy] {named}" in run.stderr, run.stderr


def test_the_policy_can_be_turned_off(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(policy={"enabled": False})
    d.start()
    with d.admin() as admin:
        status = admin.call("GetStatus", pb.GetStatusRequest())
    assert not status.policy.enabled and list(status.policy.domains) == []
    d.stop()


def test_agentctl_shows_the_policy_and_follows_its_events(daemon: Daemon) -> None:
    status = subprocess.run([*AGENTCTL, "status"], env=daemon.env(), capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert "memory policy: on (" in status.stdout and "  sessions: " in status.stdout
    watch = subprocess.Popen([*AGENTCTL, "watch"], env=daemon.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        time.sleep(1.0)
        assert watch.poll() is None  # following
        watch.send_signal(signal.SIGINT)
        assert watch.wait(10) == 0, watch.stderr.read() if watch.stderr else ""
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()


def test_a_sandbox_sees_no_other_sessions_domain(daemon: Daemon) -> None:
    with daemon.admin() as admin:
        mine, token = create_session(admin, "dom-mine", memory_budget_bytes=128 << 20)
        other, _ = create_session(admin, "dom-other", memory_budget_bytes=128 << 20)
        try:
            with daemon.sandbox(token) as sandbox:
                seen = {d.domain for d in sandbox.call("GetStatus", pb.GetStatusRequest()).policy.domains}
            assert seen == {"sessions", f"session:{mine}"}
            everything = {d.domain for d in admin.call("GetStatus", pb.GetStatusRequest()).policy.domains}
            assert f"session:{other}" in everything
        finally:
            for sid in (mine, other):
                admin.call("DeleteSession", pb.DeleteSessionRequest(session_id=sid, force=True))
