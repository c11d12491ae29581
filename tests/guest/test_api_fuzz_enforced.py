"""The API fuzz of tests/test_api_fuzz.py where memory/cpu/pids are enforced (make test-kernel): every verb that
sets limits writes them into the kernel here, and the kernel has rules of its own (a cpu.max quota of at least
1 ms per period, memory.max not below what the cgroup holds, ...). Each answer must still be OK or a status code
that says what was wrong, never UNKNOWN or INTERNAL, and the daemon must stay up.

Fewer examples than on the host (Python under TCG is about 10x slower; the module takes one to two minutes), most
of them spent on the verbs that write knobs, aimed at a running call.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import Daemon, create_session
from test_api_fuzz import ADMIN_VERBS, EXPECTED_CODES, FUZZ_SESSION, SANDBOX_VERBS, answer, fuzz_one

from agentd.api.gen import agentd_pb2 as pb
from agentd.client import Client

pytestmark = pytest.mark.guest

# The verbs that write cgroup knobs (limits at creation, updates, freeze, kill).
KNOB_VERBS = [m for m in ADMIN_VERBS if m.name in
              {"BeginToolCall", "UpdateToolCall", "FreezeToolCall", "ThawToolCall", "KillToolCall"}]
UPDATE = [m for m in ADMIN_VERBS if m.name == "UpdateToolCall"]
FEW = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def admin(daemon: Daemon) -> Iterator[Client]:
    with daemon.admin() as client:
        yield client


@pytest.fixture(scope="module")
def sandbox(daemon: Daemon, admin: Client) -> Iterator[tuple[str, Client]]:
    sid, token = create_session(admin, "fz-sandbox")
    with daemon.sandbox(token) as client:
        yield sid, client


def test_controllers_are_enforced(admin: Client) -> None:
    """Otherwise the fuzz below would only repeat the host's."""
    status = admin.call("GetStatus", pb.GetStatusRequest())
    assert {"memory", "cpu", "pids"} <= set(status.controllers_enforced), list(status.controllers_enforced)


@settings(FEW, max_examples=40)
@given(data=st.data())
def test_fuzzed_knob_writes_get_a_defined_answer(admin: Client, data: st.DataObject) -> None:
    """Aimed at a running call (a `sleep` placed in it): limits change under a live process."""
    assert KNOB_VERBS, "no verb that writes knobs"
    fuzz_one(admin, KNOB_VERBS, FUZZ_SESSION, data, pinned=("call_id", "session_id"), running=True)


@settings(FEW, max_examples=30)
@given(data=st.data())
def test_fuzzed_updates_of_a_running_call_get_a_defined_answer(admin: Client, data: st.DataObject) -> None:
    """UpdateToolCall alone: every limit it sets is written into the kernel, which refuses some (EINVAL)."""
    fuzz_one(admin, UPDATE, FUZZ_SESSION, data, pinned=("call_id",), running=True)


@settings(FEW, max_examples=30)
@given(data=st.data())
def test_fuzzed_admin_requests_get_a_defined_answer(admin: Client, data: st.DataObject) -> None:
    fuzz_one(admin, ADMIN_VERBS, FUZZ_SESSION, data)


@settings(FEW, max_examples=15)
@given(data=st.data())
def test_fuzzed_sandbox_requests_get_a_defined_answer(sandbox: tuple[str, Client], data: st.DataObject) -> None:
    session_id, client = sandbox
    fuzz_one(client, SANDBOX_VERBS, session_id, data)


@pytest.mark.parametrize("descendants", [False, True])
def test_place_agent_gets_a_defined_answer(daemon: Daemon, admin: Client, descendants: bool) -> None:
    """PlaceAgent moves a real process into the agent leaf of a session whose controllers are enforced."""
    child = subprocess.Popen(["sleep", "60"])
    try:
        with_session = admin.call("ListSessions", pb.ListSessionsRequest()).sessions
        if FUZZ_SESSION not in {s.spec.id for s in with_session}:
            create_session(admin, FUZZ_SESSION)
        request = pb.PlaceAgentRequest(session_id=FUZZ_SESSION, pid=child.pid, include_descendants=descendants)
        code = answer(admin, "PlaceAgent", request)
        assert code == grpc.StatusCode.OK or code in EXPECTED_CODES, code
    finally:
        child.kill()
        child.wait()


def test_daemon_still_serves_after_the_fuzzing(daemon: Daemon, admin: Client) -> None:
    sid, _ = create_session(admin)
    assert admin.run(["true"], sid).ok
    assert daemon.proc is not None and daemon.proc.poll() is None
