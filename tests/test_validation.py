"""Every validation error: INVALID_ARGUMENT naming the field, and nothing created in the kernel."""

from __future__ import annotations

import math
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support import SLOW, Daemon, rpc_error

from agentd.api.decoding import NOT_PROTOBUF, NOT_UTF8, undecodable_field
from agentd.api.gen import agentd_pb2 as pb
from agentd.core.config import Config, load_config
from agentd.core.errors import InvalidArgument
from agentd.core.intents import Intent, Limits, Network, derive_limits, validate_intent, validate_update
from agentd.kernel import cgroupfs

TIB = 1 << 40

BAD_INTENTS: list[tuple[dict[str, Any], str]] = [
    ({"tool": "py\x1btest"}, "intent.tool"),
    ({"tool": "x" * 200}, "intent.tool"),
    ({"tool": "py\x85test"}, "intent.tool"),  # C1 control characters (issue 9)
    ({"tool": "py\x9btest"}, "intent.tool"),
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
    ({"labels": {"k\x85": "v"}}, "intent.labels"),
    ({"labels": {"k" * 100_000: "v"}}, "intent.labels"),  # was RESOURCE_EXHAUSTED: the message repeated the key
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
    assert len(err.details().encode()) <= MAX_MESSAGE_BYTES
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
    ({"labels": {"k\x9b": "v"}}, "spec.labels"),
    ({"labels": {"k" * 100_000: "v"}}, "spec.labels"),
    ({"capture": 5}, "spec.capture"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_SESSIONS, ids=[f for _, f in BAD_SESSIONS])
def test_bad_session_is_rejected_and_creates_nothing(daemon: Daemon, fields: dict[str, Any], field: str) -> None:
    before = sorted(p.name for p in cgroupfs.children(daemon.cgroup_root / "sessions"))
    with daemon.admin() as admin:
        err = rpc_error(admin.call, "CreateSession", pb.CreateSessionRequest(spec=pb.SessionSpec(**fields)))
    assert err.code().name == "INVALID_ARGUMENT"
    assert err.details().startswith(field), err.details()
    assert len(err.details().encode()) <= MAX_MESSAGE_BYTES
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


# ----- issue 9: limits that make sense, updates validated like intents, bounded messages, undecodable requests

MIB = 1 << 20
MAX_MESSAGE_BYTES = 1024  # what every error message must stay within (gRPC's metadata limit is 8 KiB)
CONTROL = {chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]}  # Unicode category Cc: C0, DEL and C1


def _sizes(top: int = 1 << 44) -> st.SearchStrategy[int]:
    return st.one_of(st.just(0), st.integers(1, top), st.sampled_from([MIB, 64 * MIB, 1 << 30, 4 << 30]))


@st.composite
def configs(draw: st.DrawFn) -> Config:
    """Any valid [limits] section (the other sections do not shape limits)."""
    max_pids = draw(st.integers(1, 4194304))
    max_timeout = draw(st.floats(1, 604800))
    limits: dict[str, Any] = {
        "memory_class_low": draw(st.integers(4096, 1 << 40)),
        "memory_class_medium": draw(st.integers(4096, 1 << 40)),
        "memory_class_high": draw(st.integers(4096, 1 << 42)),
        "default_memory_class": draw(st.sampled_from(["low", "medium", "high"])),
        "memory_max_ratio": draw(st.floats(1, 100)),
        "memory_ceiling": draw(st.one_of(st.just(0), st.integers(1, 1 << 44))),
        "max_pids": max_pids,
        "default_pids_max": draw(st.integers(1, max_pids)),
        "max_timeout_seconds": max_timeout,
        "default_timeout_seconds": draw(st.floats(1, max_timeout)),
        "max_cpu_millicores": draw(st.integers(0, 1 << 20)),
        "cpu_weight_background": draw(st.integers(1, 10000)),
        "cpu_weight_normal": draw(st.integers(1, 10000)),
        "cpu_weight_interactive": draw(st.integers(1, 10000)),
    }
    return load_config(None, {"limits": limits})


intents = st.builds(
    Intent, tool=st.just("t"), expected_memory_bytes=_sizes(), memory_class=st.integers(0, 3),
    memory_max_bytes=_sizes(), cpu_class=st.integers(0, 3), cpu_max_millicores=st.integers(0, 100_000),
    pids_max=st.integers(0, 1 << 22), timeout_seconds=st.one_of(st.just(0.0), st.floats(0, 1e6)),
    network=st.integers(0, 2),
)


def _assert_sane(limits: Limits, config: Config, budget: int) -> None:
    assert 0 < limits.memory_high <= limits.memory_max <= config.memory_ceiling
    if budget:
        assert limits.memory_max <= budget
    assert limits.cpu_max_millicores == 0 or 10 <= limits.cpu_max_millicores <= config.max_cpu_millicores
    assert 1 <= limits.pids_max <= config.max_pids
    assert 0 < limits.timeout_seconds <= config.max_timeout_seconds
    assert limits.network in (Network.ANY, Network.NONE)
    assert limits.cpu_weight in (config.cpu_weight_background, config.cpu_weight_normal,
                                 config.cpu_weight_interactive)


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(intent=intents, budget=_sizes(), config=configs())
@example(intent=Intent(tool="t", memory_max_bytes=64 * MIB), budget=0, config=CONFIG)  # issue 9: high 1 GiB > max
def test_derived_limits_are_sane_for_every_intent_budget_and_config(
    intent: Intent, budget: int, config: Config
) -> None:
    """memory.high <= memory.max, both within the budget (when there is one) and the ceiling, every value in its
    range; what the intent declared is kept unless a cap lowers it."""
    try:
        validate_intent(intent, config)
    except InvalidArgument:
        return
    limits = derive_limits(intent, config, budget)
    _assert_sane(limits, config, budget)
    caps = [c for c in (budget, config.memory_ceiling) if c]
    if intent.memory_max_bytes:
        assert limits.memory_max == min([intent.memory_max_bytes, *caps])
    if intent.expected_memory_bytes:
        assert limits.memory_high == min(intent.expected_memory_bytes, limits.memory_max)
    assert limits.cpu_max_millicores == intent.cpu_max_millicores


UPDATE_FIELDS = ("memory_high_bytes", "memory_max_bytes", "cpu_max_millicores", "pids_max")


def _update_error(current: Limits, request: dict[str, int], budget: int, config: Config) -> str | None:
    """The request field an update must be refused for, by the rules of docs/api.md (an oracle written apart
    from the code)."""
    for name in ("memory_high_bytes", "memory_max_bytes"):
        if not 0 <= request[name] <= config.memory_ceiling:
            return name
    cpu = request["cpu_max_millicores"]
    if cpu < 0 or cpu > config.max_cpu_millicores or 0 < cpu < 10:
        return "cpu_max_millicores"
    if not 0 <= request["pids_max"] <= config.max_pids:
        return "pids_max"
    new_max = request["memory_max_bytes"] or current.memory_max
    if budget and new_max > budget:
        return "memory_max_bytes"
    if request["memory_high_bytes"] > new_max:
        return "memory_high_bytes"
    return None


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    intent=intents, budget=_sizes(), config=configs(),
    request=st.fixed_dictionaries({
        "memory_high_bytes": st.one_of(_sizes(), st.integers(-(1 << 62), 1 << 62)),
        "memory_max_bytes": st.one_of(_sizes(), st.integers(-(1 << 62), 1 << 62)),
        "cpu_max_millicores": st.one_of(st.integers(-5, 20), st.integers(-(1 << 40), 1 << 40)),
        "pids_max": st.integers(-5, 1 << 23),
    }),
)
@example(intent=Intent(tool="t"), budget=0, config=CONFIG,  # issue 9: 1-9 millicores reached the kernel
         request={"memory_high_bytes": 0, "memory_max_bytes": 0, "cpu_max_millicores": 5, "pids_max": 0})
def test_updates_are_validated_like_intents(
    intent: Intent, budget: int, config: Config, request: dict[str, int]
) -> None:
    """validate_update refuses exactly what the rules refuse, naming the request field; what it accepts is as
    sane as derived limits, with zero fields unchanged and the others as requested."""
    try:
        validate_intent(intent, config)
    except InvalidArgument:
        return
    current = derive_limits(intent, config, budget)
    expected_error = _update_error(current, request, budget, config)
    try:
        new = validate_update(current, *(request[f] for f in UPDATE_FIELDS), budget, config)
    except InvalidArgument as exc:
        assert exc.field == expected_error, str(exc)
        return
    assert expected_error is None, f"accepted, but {expected_error} is wrong"
    _assert_sane(new, config, budget)
    for name, before, after in [
        ("memory_max_bytes", current.memory_max, new.memory_max),
        ("cpu_max_millicores", current.cpu_max_millicores, new.cpu_max_millicores),
        ("pids_max", current.pids_max, new.pids_max),
        ("memory_high_bytes", min(current.memory_high, new.memory_max), new.memory_high),
    ]:
        assert after == (request[name] or before), name
    assert (new.cpu_weight, new.timeout_seconds, new.network) == (
        current.cpu_weight, current.timeout_seconds, current.network)


def test_update_below_the_cpu_minimum_is_refused_through_the_daemon(daemon: Daemon, session: tuple[str, str]) -> None:
    """Issue 9: 1-9 millicores reached the kernel (EINVAL -> INTERNAL after memory.* were written)."""
    sid, _ = session
    with daemon.admin() as admin:
        begun = admin.begin(pb.Intent(tool="t"), sid)
        try:
            for millicores in (1, 9):
                update = pb.UpdateToolCallRequest(call_id=begun.call_id, cpu_max_millicores=millicores)
                err = rpc_error(admin.call, "UpdateToolCall", update)
                assert err.code().name == "INVALID_ARGUMENT", err.details()
                assert err.details().startswith("cpu_max_millicores"), err.details()
        finally:
            admin.end(begun.call_id, None)


def _intent_error(tool: str, labels: dict[str, str]) -> str | None:
    """The field an intent with these strings must be refused for (oracle apart from the code)."""
    if len(tool.encode()) > 128 or CONTROL & set(tool):
        return "intent.tool"
    for key, value in labels.items():
        if not key or len(key.encode()) > 64 or len(value.encode()) > 256 or CONTROL & set(key + value):
            return "intent.labels"
    return None


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(tool=st.text(max_size=140), labels=st.dictionaries(st.text(max_size=70), st.text(max_size=260), max_size=2))
@example(tool="py\x85test", labels={})  # issue 9: C1 control characters were accepted
@example(tool="t", labels={"k\x9b": "v"})
@example(tool="t", labels={"k": "v\x85"})
@example(tool="t", labels={"k" * 100_000: "v"})  # issue 9: RESOURCE_EXHAUSTED (the message repeated the key)
@example(tool="\U0001f600" * 100_000, labels={})
def test_arbitrary_strings_through_the_daemon(
    daemon: Daemon, session: tuple[str, str], tool: str, labels: dict[str, str]
) -> None:
    """Any tool name and labels: accepted, or INVALID_ARGUMENT naming the field in a message of bounded size."""
    sid, token = session
    expected = _intent_error(tool, labels)
    with daemon.sandbox(token) as sandbox:
        try:
            begun = sandbox.begin(pb.Intent(tool=tool, labels=labels), sid)
        except grpc.RpcError as err:
            assert (err.code().name, expected) == ("INVALID_ARGUMENT", err.details().split(":")[0].split("[")[0])
            assert len(err.details().encode()) <= MAX_MESSAGE_BYTES
            return
        sandbox.end(begun.call_id, None)
    assert expected is None, f"accepted an intent with a bad {expected}"


HUGE = "x" * 100_000


@pytest.mark.parametrize(("method", "request_", "code"), [
    ("GetSession", pb.GetSessionRequest(session_id=HUGE), "NOT_FOUND"),
    ("WaitToolCall", pb.WaitToolCallRequest(call_id=HUGE), "NOT_FOUND"),
    ("UpdateToolCall", pb.UpdateToolCallRequest(call_id=HUGE), "NOT_FOUND"),
    ("CreateSession", pb.CreateSessionRequest(spec=pb.SessionSpec(labels={HUGE: "v"})), "INVALID_ARGUMENT"),
    ("BeginToolCall", pb.BeginToolCallRequest(session_id=HUGE, intent=pb.Intent(tool="t")), "NOT_FOUND"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_error_messages_are_bounded(daemon: Daemon, method: str, request_: Any, code: str) -> None:
    """Whatever the caller sent, the error message stays small (it travels in gRPC metadata, limit 8 KiB)."""
    with daemon.admin() as admin:
        err = rpc_error(admin.call, method, request_)
    assert err.code().name == code, err.details()
    assert 0 < len(err.details().encode()) <= MAX_MESSAGE_BYTES


@pytest.mark.parametrize("timeout", [math.nan, math.inf, -math.inf])
def test_wait_timeout_must_be_finite(daemon: Daemon, session: tuple[str, str], timeout: float) -> None:
    """NaN used to mean 'wait forever' (and inf did): refused, naming the field."""
    sid, _ = session
    with daemon.admin() as admin:
        begun = admin.begin(pb.Intent(tool="t"), sid)
        try:
            request = pb.WaitToolCallRequest(call_id=begun.call_id, timeout_seconds=timeout)
            err = rpc_error(admin.call, "WaitToolCall", request, timeout=5 * SLOW)
            assert err.code().name == "INVALID_ARGUMENT", err.details()
            assert err.details().startswith("timeout_seconds")
        finally:
            admin.end(begun.call_id, None)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
    """One length-delimited field on the wire, written by hand: a Python client cannot send invalid UTF-8."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


BAD_UTF8 = b"py\xfftest"
UNDECODABLE: list[tuple[str, bytes, str]] = [
    ("BeginToolCall", _bytes_field(1, BAD_UTF8), "session_id"),
    ("BeginToolCall", _bytes_field(2, _bytes_field(1, BAD_UTF8)), "intent.tool"),
    ("BeginToolCall", _bytes_field(2, _bytes_field(2, b"ok") + _bytes_field(2, BAD_UTF8)), "intent.argv[1]"),
    ("BeginToolCall", _bytes_field(2, _bytes_field(11, _bytes_field(1, BAD_UTF8) + _bytes_field(2, b"v"))),
     "intent.labels"),
    ("BeginToolCall", _bytes_field(2, _bytes_field(11, _bytes_field(1, b"k") + _bytes_field(2, b"\xc3("))),
     "intent.labels"),
    ("CreateSession", _bytes_field(1, _bytes_field(1, b"\xed\xa0\x80")), "spec.id"),  # an encoded surrogate
    ("KillToolCall", _bytes_field(1, b"c") + _bytes_field(2, BAD_UTF8), "reason"),
    ("GetSession", b"\x0a\x05ab", "request"),  # a length beyond the end: not protobuf at all
    ("GetSession", b"\xff\xff\xff", "request"),
]


@pytest.mark.parametrize(("method", "raw", "field"), UNDECODABLE, ids=[f"{m}-{f}" for m, _, f in UNDECODABLE])
def test_undecodable_request_names_the_field(
    daemon: Daemon, session: tuple[str, str], method: str, raw: bytes, field: str
) -> None:
    """Invalid UTF-8 in a string field (or bytes that are not protobuf): INVALID_ARGUMENT naming the field, not
    UNKNOWN 'Unexpected DecodeError'; nothing created."""
    sid, _ = session
    before = sorted(p.name for p in cgroupfs.children(daemon.session_path(sid)))
    with grpc.insecure_channel(f"unix:{daemon.admin_socket}") as channel:
        call = channel.unary_unary(f"/agentd.v1.Admin/{method}")  # no serializer: the bytes go as they are
        err = rpc_error(call, raw, timeout=30 * SLOW)
    assert err.code().name == "INVALID_ARGUMENT", err.details()
    assert err.details().startswith(f"{field}:"), err.details()
    assert sorted(p.name for p in cgroupfs.children(daemon.session_path(sid))) == before


def test_undecodable_request_on_the_sandbox_service(daemon: Daemon, session: tuple[str, str]) -> None:
    _, token = session
    with grpc.insecure_channel(f"unix:{daemon.sandbox_socket}") as channel:
        call = channel.unary_unary("/agentd.v1.Sandbox/BeginToolCall")
        err = rpc_error(call, _bytes_field(2, _bytes_field(1, BAD_UTF8)), timeout=30 * SLOW,
                        metadata=(("x-agentd-session-token", token),))
    assert (err.code().name, err.details().split(":")[0]) == ("INVALID_ARGUMENT", "intent.tool"), err.details()


wire_messages = st.recursive(
    st.binary(max_size=12),
    lambda inner: st.lists(st.tuples(st.integers(1, 12), inner), max_size=4).map(
        lambda fields: b"".join(_bytes_field(number, payload) for number, payload in fields)),
    max_leaves=8,
)


@settings(max_examples=1000, deadline=None)
@given(data=st.one_of(wire_messages, st.binary(max_size=40)))
def test_undecodable_field_reads_any_bytes(data: bytes) -> None:
    """Whatever the bytes, the walker answers a field of the request (or 'request') without raising, and what
    it calls invalid UTF-8 protobuf refuses too."""
    descriptor = pb.BeginToolCallRequest.DESCRIPTOR
    field, why = undecodable_field(descriptor, data)
    assert field == "request" or field.split(".")[0] in descriptor.fields_by_name, field
    assert why in (NOT_UTF8, NOT_PROTOBUF)
    if why == NOT_UTF8:
        with pytest.raises(DecodeError):
            pb.BeginToolCallRequest.FromString(data)
