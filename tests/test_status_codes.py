"""One table from errors to status codes, and the gRPC wrapper that applies it: every answer and every metric
carries the code the caller really got. Served by a real grpc.aio server on a Unix socket."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from agentd.api import status
from agentd.api.join import HoldRefused
from agentd.api.servicer import rpc
from agentd.core import errors


class _Probe:
    """A servicer whose one method raises what the test gives it; requests are recorded as the wrapper reports
    them to metrics."""

    def __init__(self, failure: BaseException | None) -> None:
        self.failure = failure
        self.metrics = self
        self.observed: list[tuple[str, str]] = []

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        self.observed.append((method, code))

    @rpc
    async def Probe(self, request: bytes, context: Any) -> bytes:
        if isinstance(self.failure, _Abort):
            await context.abort(grpc.StatusCode.ABORTED, "answered by the method")
        if self.failure is not None:
            raise self.failure
        return b"fine"


class _Abort(Exception):
    """Not raised: tells the probe to answer with a code of its own (context.abort)."""


def _call(tmp_path: Path, failure: BaseException | None) -> tuple[grpc.StatusCode, str, list[tuple[str, str]]]:
    probe = _Probe(failure)
    identity: Callable[[bytes], bytes] = lambda data: data  # noqa: E731

    async def main() -> tuple[grpc.StatusCode, str]:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(
            probe.Probe, request_deserializer=identity, response_serializer=identity
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Probe", {"Probe": handler}),))
        server.add_insecure_port(f"unix:{tmp_path / 'probe.sock'}")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"unix:{tmp_path / 'probe.sock'}") as channel:
                method = channel.unary_unary("/test.Probe/Probe", request_serializer=identity,
                                             response_deserializer=identity)
                try:
                    await method(b"", timeout=10)
                except grpc.aio.AioRpcError as exc:
                    return exc.code(), exc.details() or ""
                return grpc.StatusCode.OK, ""
        finally:
            await server.stop(None)

    code, details = asyncio.run(main())
    return code, details, probe.observed


@pytest.mark.parametrize(
    ("failure", "code", "details"),
    [
        (None, grpc.StatusCode.OK, ""),
        (errors.NotFound("no such call"), grpc.StatusCode.NOT_FOUND, "no such call"),
        (HoldRefused("over the quota"), grpc.StatusCode.RESOURCE_EXHAUSTED, "over the quota"),  # a subclass
        (status.DeadlineExceeded("did not finish"), grpc.StatusCode.DEADLINE_EXCEEDED, "did not finish"),
        (KeyError("tc-1"), grpc.StatusCode.INTERNAL, "internal error: KeyError: 'tc-1'"),
        (OSError(16, "Device or resource busy"), grpc.StatusCode.INTERNAL,
         "internal error: OSError: [Errno 16] Device or resource busy"),
        # A TimeoutError from anywhere but WaitToolCall's own wait is not that wait running out.
        (TimeoutError("lock"), grpc.StatusCode.INTERNAL, "internal error: TimeoutError: lock"),
        (_Abort(), grpc.StatusCode.ABORTED, "answered by the method"),
    ],
)
def test_answer_and_metrics_carry_the_code_the_caller_got(
    tmp_path: Path, failure: BaseException | None, code: grpc.StatusCode, details: str
) -> None:
    got, got_details, observed = _call(tmp_path, failure)
    assert (got, got_details) == (code, details)
    assert observed == [("Probe", code.name)]


def test_one_table_for_both_sockets() -> None:
    """The join socket answers `ERR <code name>` from the same table (see test_join_socket for the wire)."""
    assert status.status_code(errors.ResourceExhausted("x")).name == "RESOURCE_EXHAUSTED"
    assert status.status_code(errors.AgentdError("x")) == grpc.StatusCode.UNKNOWN
    assert status.status_code(RuntimeError("x")) == grpc.StatusCode.INTERNAL
    assert len(status.message(RuntimeError("x" * 100_000))) <= status.MAX_MESSAGE
