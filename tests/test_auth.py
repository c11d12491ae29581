"""Authorization: a sandbox acts only inside its own session; admin verbs need the admin socket."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from support import AGENTCTL, Daemon, call_cgroups, create_session, rpc_error, spawn_in

from agentd.api.gen import agentd_pb2 as pb
from agentd.joinclient import JoinError, join


def test_socket_modes(daemon: Daemon) -> None:
    assert stat.S_IMODE(os.stat(daemon.admin_socket).st_mode) == 0o660
    assert stat.S_IMODE(os.stat(daemon.sandbox_socket).st_mode) == 0o666
    assert stat.S_IMODE(os.stat(daemon.join_socket).st_mode) == 0o666


def test_token_is_confined_to_its_session(daemon: Daemon) -> None:
    with daemon.admin() as admin:
        a, token_a = create_session(admin, "auth-a")
        b, token_b = create_session(admin, "auth-b")
        try:
            call_b = admin.begin(pb.Intent(tool="b-only"), b)
            with daemon.sandbox(token_a) as sandbox_a:
                assert rpc_error(sandbox_a.begin, pb.Intent(tool="x"), b).code().name == "PERMISSION_DENIED"
                for method, request in [
                    ("GetToolCall", pb.ToolCallRequest(call_id=call_b.call_id)),
                    ("WaitToolCall", pb.WaitToolCallRequest(call_id=call_b.call_id, timeout_seconds=0.1)),
                    ("EndToolCall", pb.EndToolCallRequest(call_id=call_b.call_id)),
                    ("UpdateToolCall", pb.UpdateToolCallRequest(call_id=call_b.call_id, pids_max=10)),
                    ("GetSession", pb.GetSessionRequest(session_id=b)),
                    ("ListToolCalls", pb.ListToolCallsRequest(session_id=b)),
                ]:
                    err = rpc_error(sandbox_a.call, method, request)
                    assert err.code().name == "PERMISSION_DENIED", (method, err.details())
                # Its own session works, and listing shows only its own calls.
                own = sandbox_a.begin(pb.Intent(tool="mine"))
                listed = sandbox_a.call("ListToolCalls", pb.ListToolCallsRequest(include_active=True))
                assert {c.call_id for c in listed.active} == {own.call_id}
                assert sandbox_a.end(own.call_id, None).session_id == a
                # Admin verbs are not part of the Sandbox service at all.
                err = rpc_error(sandbox_a.call, "CreateSession", pb.CreateSessionRequest(), admin=True)
                assert err.code().name == "UNIMPLEMENTED"
            with daemon.sandbox("not-a-token") as stranger:
                assert rpc_error(stranger.begin, pb.Intent()).code().name == "PERMISSION_DENIED"
            # B's call still exists, untouched.
            assert admin.call("GetToolCall", pb.ToolCallRequest(call_id=call_b.call_id)).state == pb.CALL_STATE_PENDING
            admin.end(call_b.call_id, None)
            del token_b
        finally:
            for sid in (a, b):
                admin.call("DeleteSession", pb.DeleteSessionRequest(session_id=sid, force=True))


def test_foreign_process_cannot_join_a_sandbox_call(daemon: Daemon, session: tuple[str, str]) -> None:
    """A sandbox-begun call accepts only processes from its own session's cgroups (checked by SO_PEERCRED)."""
    sid, token = session
    with daemon.sandbox(token) as sandbox:
        begun = sandbox.begin(pb.Intent(tool="guarded"))
        # This test process lives outside the session: refused, and the token stays usable by the session.
        try:
            join(begun.join_socket, begun.join_token)
            raise AssertionError("a foreign process joined")
        except JoinError as exc:
            assert exc.code == "PERMISSION_DENIED" and "not in session" in str(exc)
        # A process inside the session's agent/ leaf presents the same token and is placed.
        code = (
            "import sys; from agentd.joinclient import join; "
            f"print(join({begun.join_socket!r}, {begun.join_token!r})); "
            "print(open('/proc/self/cgroup').read())"
        )
        agent = spawn_in(daemon.session_path(sid) / "agent", [sys.executable, "-c", code], env=daemon.env(),
                         stdout=subprocess.PIPE)
        out, _ = agent.communicate(timeout=60)
        assert agent.returncode == 0
        assert begun.call_id in out.decode() and f"tc-{begun.call_id}" in out.decode()
        assert sandbox.wait(begun.call_id, timeout=10).session_id == sid


def test_sandboxed_agentctl_run_from_the_agent_leaf(daemon: Daemon, session: tuple[str, str]) -> None:
    """The real sandbox path: agentctl inside the session's agent/ cgroup, token from the environment."""
    sid, token = session
    proc = spawn_in(daemon.session_path(sid) / "agent",
                    [*AGENTCTL, "run", "--", "sh", "-c", "cat /proc/self/cgroup; exit 3"],
                    env=daemon.env(token), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert f"/sessions/{sid}/tc-" in out.decode()
    # A token from the environment of a process outside the session cannot place it.
    outside = subprocess.run([*AGENTCTL, "run", "--", "true"], env=daemon.env(token), capture_output=True,
                             timeout=60)
    assert outside.returncode == 126 and b"PERMISSION_DENIED" in outside.stderr


def test_health_service_on_both_sockets(daemon: Daemon) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for path, service in ((daemon.admin_socket, "agentd.v1.Admin"), (daemon.sandbox_socket, "agentd.v1.Sandbox")):
        with grpc.insecure_channel(f"unix:{path}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for name in ("", service):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING


def place_an_outsider(daemon: Daemon, session: tuple[str, str], code: str) -> list[str]:
    """Run `code` (Python; {pid} is a process outside the session) in the session's agent/ leaf with its token;
    return the words it printed, once checked that the outside process was not moved."""
    sid, token = session
    outsider = subprocess.Popen(["sleep", "100"])
    try:
        agent = spawn_in(daemon.session_path(sid) / "agent", [sys.executable, "-c", code.format(pid=outsider.pid)],
                         env=daemon.env(token), stdout=subprocess.PIPE)
        out, _ = agent.communicate(timeout=60)
        assert "agentd" not in Path(f"/proc/{outsider.pid}/cgroup").read_text()
        return out.decode().split()
    finally:
        outsider.kill()
        outsider.wait()


def test_pidfd_placement_needs_sender_and_target_in_the_session(daemon: Daemon, session: tuple[str, str]) -> None:
    code = (
        "import os, sys\n"
        "from agentd.joinclient import JoinError, Placement\n"
        "from agentd.client import Client\n"
        "client = Client(os.environ['AGENTD_SOCKET'], os.environ['AGENTD_SESSION_TOKEN'])\n"
        "begun = client.begin(__import__('agentd.api.gen.agentd_pb2', fromlist=['x']).Intent(tool='steal'))\n"
        "placement = Placement(begun.join_socket)\n"
        "try:\n"
        "    placement.place(begun.join_token, os.pidfd_open({pid}))\n"
        "    print('PLACED')\n"
        "except JoinError as exc:\n"
        "    print(exc.code)\n"
        "other = Placement(begun.join_socket)\n"
        "try:\n"
        "    other.end(begun.call_id, 0)\n"
        "except JoinError as exc:\n"
        "    print(exc.code)\n"
    )
    assert place_an_outsider(daemon, session, code) == ["PERMISSION_DENIED", "PERMISSION_DENIED"]


def test_held_process_is_checked_like_a_join(daemon: Daemon, session: tuple[str, str]) -> None:
    """BeginToolCall naming a held process: a sandbox can only have its own session's processes placed; a refused
    placement is marked as such (the command never ran) and leaves no call behind."""
    sid, token = session
    code = (
        "import os, grpc\n"
        "from agentd.api.gen import agentd_pb2 as pb\n"
        "from agentd.client import PLACEMENT_METADATA, Client\n"
        "client = Client(os.environ['AGENTD_SOCKET'], os.environ['AGENTD_SESSION_TOKEN'])\n"
        "try:\n"
        "    client.begin(pb.Intent(tool='steal'), pid={pid})\n"
        "    print('PLACED')\n"
        "except grpc.RpcError as exc:\n"
        "    print(exc.code().name, dict(exc.trailing_metadata()).get(PLACEMENT_METADATA))\n"
    )
    assert place_an_outsider(daemon, session, code) == ["PERMISSION_DENIED", "refused"]
    assert not call_cgroups(daemon.session_path(sid))
    with daemon.sandbox(token) as sandbox:
        assert not sandbox.call("ListToolCalls", pb.ListToolCallsRequest(include_active=True)).active
