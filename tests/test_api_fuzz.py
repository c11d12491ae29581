"""Every admin verb with fuzzed requests, against a real daemon: each answer is OK or a status code that says
what was wrong; never UNKNOWN or INTERNAL (an exception agentd did not expect), and the daemon stays up."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from support import Daemon, create_session

from agentd.api.gen import agentd_pb2 as pb
from agentd.client import Client

FUZZ_SESSION = "fz"
EXPECTED_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_UINT32: (0, (1 << 32) - 1),
    FieldDescriptor.TYPE_UINT64: (0, (1 << 64) - 1),
}
# Values at the edges of what agentd and the kernel accept: the 10-millicore minimum (cpu.max quotas below 1 ms
# per 100 ms period are EINVAL), a page, sizes, the int64 limits.
_EDGES = st.sampled_from([0, 1, -1, 9, 10, 11, 999, 1000, 4095, 4096, 1 << 20, 1 << 30, 1 << 40, 1 << 62])


def _scalar(field: FieldDescriptor, likely: dict[str, str]) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        text = st.text(max_size=20)
        return st.one_of(st.just(likely[field.name]), text) if field.name in likely else text
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=64 if kind == FieldDescriptor.TYPE_DOUBLE else 32)
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        return st.integers(-2, len(field.enum_type.values) + 1)  # proto3 enums are open: unknown values pass
    if kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        return st.one_of(_EDGES.filter(lambda v: low <= v <= high), st.integers(max(low, -2), 12),
                         st.integers(low, high))
    raise NotImplementedError(f"no strategy for field {field.full_name}")


def messages(descriptor: Descriptor, likely: dict[str, str], depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Keyword arguments for a message of `descriptor`'s type: any subset of its fields, any values (string
    fields named in `likely` often take that value: a random id would only ever meet NOT_FOUND)."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            fields[field.name] = st.dictionaries(st.text(max_size=12), st.text(max_size=12), max_size=3)
            continue
        if field.message_type is not None:
            if depth >= 2:
                continue
            nested = messages(field.message_type, likely, depth + 1)
            value = nested.map(functools.partial(_build, field.message_type))
        else:
            value = _scalar(field, likely)
        fields[field.name] = st.lists(value, max_size=3) if field.is_repeated else value
    return st.fixed_dictionaries({}, optional=fields)


def _build(descriptor: Descriptor, kwargs: dict[str, Any]) -> Any:
    return getattr(pb, descriptor.name)(**kwargs)


SERVICES = pb.DESCRIPTOR.services_by_name
# PlaceAgent moves real processes; it is fuzzed with pids of its own (below), never with random ones.
ADMIN_VERBS = [m for m in SERVICES["Admin"].methods if m.name != "PlaceAgent"]
SANDBOX_VERBS = list(SERVICES["Sandbox"].methods)


@pytest.fixture(scope="module")
def admin(daemon: Daemon) -> Iterator[Client]:
    with daemon.admin() as client:
        yield client


@pytest.fixture(scope="module")
def sandbox(daemon: Daemon, admin: Client) -> Iterator[tuple[str, Client]]:
    sid, token = create_session(admin, "fz-sandbox")
    with daemon.sandbox(token) as client:
        yield sid, client


@contextlib.contextmanager
def target_call(client: Client, session_id: str, running: bool = False) -> Iterator[str]:
    """A call to aim requests at, in a session that exists (made again if a fuzzed DeleteSession removed it):
    not joined yet, or with `running` a `sleep` placed in it."""
    if session_id == FUZZ_SESSION:
        with contextlib.suppress(grpc.RpcError):
            create_session(client, FUZZ_SESSION)
    begun = client.begin(pb.Intent(tool="target"), session_id, report_exit=False)
    pid = client.spawn(begun, ["sleep", "600"]) if running else None
    try:
        yield begun.call_id
    finally:
        with contextlib.suppress(grpc.RpcError):  # ended, killed or deleted by the request
            client.end(begun.call_id, None)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def answer(client: Client, verb: str, request: Any) -> grpc.StatusCode:
    try:
        client.call(verb, request, timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def fuzz_one(
    client: Client, verbs: list[Any], session_id: str, data: st.DataObject, pinned: tuple[str, ...] = (),
    running: bool = False,
) -> None:
    """One fuzzed request of one of `verbs`, aimed at a target call (`running`: see target_call); the fields named
    in `pinned` always name the session and the target call (the rest of the request is fuzzed)."""
    method = data.draw(st.sampled_from(verbs), label="verb")
    with target_call(client, session_id, running) as call_id:
        likely = {"session_id": session_id, "id": session_id, "call_id": call_id}
        kwargs = data.draw(messages(method.input_type, likely), label="request")
        kwargs.update({name: likely[name] for name in pinned if name in method.input_type.fields_by_name})
        if method.name == "WaitToolCall":  # a wait on a real call blocks as long as asked (0: for ever)
            kwargs["timeout_seconds"] = min(abs(kwargs.get("timeout_seconds", 0.0)), 0.05) or 0.05
        kwargs.pop("held_process", None)  # agentd waits 5 s for a HOLD; test_held_process_refusals covers it
        code = answer(client, method.name, _build(method.input_type, kwargs))
    event(f"{method.name} {code.name}")
    assert code == grpc.StatusCode.OK or code in EXPECTED_CODES, (method.name, kwargs, code)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_admin_requests_get_a_defined_answer(admin: Client, data: st.DataObject) -> None:
    fuzz_one(admin, ADMIN_VERBS, FUZZ_SESSION, data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_sandbox_requests_get_a_defined_answer(sandbox: tuple[str, Client], data: st.DataObject) -> None:
    session_id, client = sandbox
    fuzz_one(client, SANDBOX_VERBS, session_id, data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pid=st.sampled_from(["own child", "agentd", 0, 1, -1, (1 << 31) - 1]), descendants=st.booleans())
def test_fuzzed_place_agent_gets_a_defined_answer(
    daemon: Daemon, admin: Client, pid: int | str, descendants: bool
) -> None:
    assert daemon.proc is not None
    child = subprocess.Popen(["sleep", "60"])
    try:
        target = child.pid if pid == "own child" else daemon.proc.pid if pid == "agentd" else pid
        request = pb.PlaceAgentRequest(session_id=FUZZ_SESSION, pid=int(target), include_descendants=descendants)
        code = answer(admin, "PlaceAgent", request)
        assert code == grpc.StatusCode.OK or code in EXPECTED_CODES, (pid, code)
        if pid in ("agentd", 1):
            assert code != grpc.StatusCode.OK, f"{pid} must never be placed into a session"
    finally:
        child.kill()
        child.wait()


def test_daemon_still_serves_after_the_fuzzing(daemon: Daemon, admin: Client) -> None:
    sid, _ = create_session(admin)
    assert admin.run(["true"], sid).ok
    assert daemon.proc is not None and daemon.proc.poll() is None
