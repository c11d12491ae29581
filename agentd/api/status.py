"""One table from agentd's errors to status codes: gRPC answers carry the code, the join socket its name."""

from __future__ import annotations

import grpc

from agentd.core import errors

MAX_MESSAGE = 1000  # characters of an unexpected error's text passed on to the caller


class DeadlineExceeded(errors.AgentdError):
    """WaitToolCall's own wait ended before the tool call did."""


STATUS_CODES: dict[type[errors.AgentdError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The code of an error: that of its class or nearest listed base class; UNKNOWN for an AgentdError not
    listed, INTERNAL for anything else (a defect, or the kernel refusing an operation)."""
    for cls in type(exc).__mro__:
        code = STATUS_CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.UNKNOWN if isinstance(exc, errors.AgentdError) else grpc.StatusCode.INTERNAL


def message(exc: BaseException) -> str:
    """What the caller is told: an AgentdError's own message; for anything else what failed, bounded."""
    if isinstance(exc, errors.AgentdError):
        return str(exc)
    return f"internal error: {type(exc).__name__}: {exc}"[:MAX_MESSAGE]  # a CgroupError's text names the file
