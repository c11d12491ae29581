"""Every validation error: INVALID_ARGUMENT naming the field, and nothing created in the kernel."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import Daemon, rpc_error

from agentd.api.gen import agentd_pb2 as pb
from agentd.core.config import load_config
from agentd.core.errors import InvalidArgument
from agentd.core.intents import Intent, derive_limits, validate_intent
from agentd.kernel import cgroupfs

TIB = 1 << 40

BAD_INTENTS: list[tuple[dict[str, Any], str]] = [
    ({"tool": "py\x1btest"}, "intent.tool"),
    ({"tool": "x" * 200}, "intent.tool"),
    ({"argv": ["ok", "nul\x00byte"]}, "intent.argv[1]"),
    ({"expected_memory_bytes": -1}, "intent.expected_memory_bytes"),
    ({"expected_memory_bytes": 64 * TIB}, "intent.expected_memory_bytes"),
    ({"memory_class": 9}, "intent.memory_class"),
    ({"memory_max_bytes": -5}, "intent.memory_max_bytes"),
    ({"memory_max_bytes": 1 << 20, "expected_memory_bytes": 1 << 30}, "intent.memory_max_bytes"),
    ({"cpu_class": 42}, "intent.cpu_class"),
    ({"cpu_max_millicores": -1}, "intent.cpu_max_millicores"),
    ({"cpu_max_millicores": 5}, "intent.cpu_max_millicores"),
    ({"cpu_max_millicores": 10_000_000}, "intent.cpu_max_millicores"),
    ({"pids_max": -3}, "intent.pids_max"),
    ({"pids_max": 1 << 30}, "intent.pids_max"),
    ({"timeout_seconds": -1.0}, "intent.timeout_seconds"),
    ({"timeout_seconds": math.nan}, "intent.timeout_seconds"),
    ({"timeout_seconds": math.inf}, "intent.timeout_seconds"),
    ({"timeout_seconds": 10.0 * 86400 * 365}, "intent.timeout_seconds"),
    ({"network": 7}, "intent.network"),
    ({"labels": {"k": "v\nx"}}, "intent.labels"),
    ({"labels": {"": "v"}}, "intent.labels"),
    ({"labels": {f"k{i}": "v" for i in range(40)}}, "intent.labels"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_INTENTS, ids=[f for _, f in BAD_INTENTS])
def test_bad_intent_is_rejected_and_creates_nothing(
    daemon: Daemon, session: tuple[str, str], fields: dict[str, Any], field: str
) -> None:
    sid, token = session
    before = sorted(p.name for p in cgroupfs.children(daemon.session_path(sid)))
    with daemon.sandbox(token) as sandbox:
        err = rpc_error(sandbox.begin, pb.Intent(**fields), sid)
    assert err.code().name == "INVALID_ARGUMENT"
    assert err.details().startswith(field), err.details()
    assert sorted(p.name for p in cgroupfs.children(daemon.session_path(sid))) == before


BAD_SESSIONS: list[tuple[dict[str, Any], str]] = [
    ({"id": "../escape"}, "spec.id"),
    ({"id": "a" * 65}, "spec.id"),
    ({"id": "bad\nid"}, "spec.id"),
    ({"priority": 17}, "spec.priority"),
    ({"memory_budget_bytes": -1}, "spec.memory_budget_bytes"),
    ({"memory_budget_bytes": 64 * TIB}, "spec.memory_budget_bytes"),
    ({"memory_protected_bytes": 1 << 20, "priority": pb.PRIORITY_LOW}, "spec.memory_protected_bytes"),
    ({"memory_protected_bytes": 1 << 30, "memory_budget_bytes": 1 << 20, "priority": pb.PRIORITY_HIGH},
     "spec.memory_protected_bytes"),
    ({"pids_budget": -1}, "spec.pids_budget"),
    ({"labels": {"k": "\x07"}}, "spec.labels"),
    ({"capture": 5}, "spec.capture"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_SESSIONS, ids=[f for _, f in BAD_SESSIONS])
def test_bad_session_is_rejected_and_creates_nothing(daemon: Daemon, fields: dict[str, Any], field: str) -> None:
    before = sorted(p.name for p in cgroupfs.children(daemon.cgroup_root / "sessions"))
    with daemon.admin() as admin:
        err = rpc_error(admin.call, "CreateSession", pb.CreateSessionRequest(spec=pb.SessionSpec(**fields)))
    assert err.code().name == "INVALID_ARGUMENT"
    assert err.details().startswith(field), err.details()
    assert sorted(p.name for p in cgroupfs.children(daemon.cgroup_root / "sessions")) == before


def test_other_request_fields_are_validated(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, _ = session
    with daemon.admin() as admin:
        assert rpc_error(admin.begin, pb.Intent(), "").code().name == "INVALID_ARGUMENT"
        assert rpc_error(admin.begin, pb.Intent(), "no-such-session").code().name == "NOT_FOUND"
        assert rpc_error(admin.wait, "nope", 1).code().name == "NOT_FOUND"
        begun = admin.begin(pb.Intent(tool="t"), sid)
        bad_end = pb.EndToolCallRequest(call_id=begun.call_id, has_exit_status=True, exit_code=300)
        assert rpc_error(admin.call, "EndToolCall", bad_end).code().name == "INVALID_ARGUMENT"
        bad_wait = pb.WaitToolCallRequest(call_id=begun.call_id, timeout_seconds=-1)
        assert rpc_error(admin.call, "WaitToolCall", bad_wait).code().name == "INVALID_ARGUMENT"
        bad_list = pb.ListToolCallsRequest(limit=-1)
        assert rpc_error(admin.call, "ListToolCalls", bad_list).code().name == "INVALID_ARGUMENT"
        for update, field in [
            (pb.UpdateToolCallRequest(memory_max_bytes=-1), "memory_max_bytes"),
            (pb.UpdateToolCallRequest(memory_high_bytes=64 * TIB), "memory_high_bytes"),
            (pb.UpdateToolCallRequest(pids_max=-1), "pids_max"),
            (pb.UpdateToolCallRequest(cpu_max_millicores=-1), "cpu_max_millicores"),
        ]:
            update.call_id = begun.call_id
            err = rpc_error(admin.call, "UpdateToolCall", update)
            assert err.code().name == "INVALID_ARGUMENT" and err.details().startswith(field), err.details()
        assert admin.end(begun.call_id, None).outcome == pb.OUTCOME_CANCELLED
        assert rpc_error(admin.call, "PlaceAgent", pb.PlaceAgentRequest(session_id=sid, pid=2**31 - 1),
                         admin=True).code().name == "NOT_FOUND"


def test_wait_deadline(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, _ = session
    with daemon.admin() as admin:
        begun = admin.begin(pb.Intent(tool="t"), sid)
        err = rpc_error(admin.call, "WaitToolCall", pb.WaitToolCallRequest(call_id=begun.call_id, timeout_seconds=0.2))
        assert err.code().name == "DEADLINE_EXCEEDED"
        admin.end(begun.call_id, None)


CONFIG = load_config(None)
texts = st.text(max_size=40)
sizes = st.integers(min_value=-(1 << 62), max_value=1 << 62)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    tool=texts, argv=st.lists(texts, max_size=4), expected=sizes, memory_class=st.integers(-2, 6), hard=sizes,
    cpu_class=st.integers(-2, 6), cpu_max=st.integers(-100, 100_000), pids=st.integers(-10, 1 << 24),
    timeout=st.floats(allow_nan=True, allow_infinity=True), network=st.integers(-1, 4),
    labels=st.dictionaries(texts, texts, max_size=3),
)
def test_fuzzed_intents_validate_or_name_a_field(
    tool: str, argv: list[str], expected: int, memory_class: int, hard: int, cpu_class: int, cpu_max: int,
    pids: int, timeout: float, network: int, labels: dict[str, str],
) -> None:
    """Any intent either validates and yields sane limits, or is refused with InvalidArgument naming a field."""
    intent = Intent(tool, tuple(argv), expected, memory_class, hard, cpu_class, cpu_max, pids, timeout, network, labels)
    try:
        validate_intent(intent, CONFIG)
    except InvalidArgument as exc:
        assert exc.field.startswith("intent.")
        return
    limits = derive_limits(intent, CONFIG, session_budget=2 << 30)
    assert 0 < limits.memory_high <= limits.memory_max <= 2 << 30
    assert 0 < limits.timeout_seconds <= CONFIG.max_timeout_seconds
    assert 1 <= limits.pids_max <= CONFIG.max_pids
    assert limits.knobs()["memory.oom.group"] == "1"
