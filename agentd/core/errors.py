"""Errors the core raises; the API layer maps each to one gRPC status code."""

from __future__ import annotations

# An error message travels back in gRPC metadata (8 KiB soft limit, percent-encoded): user input quoted in it is
# cut to MAX_QUOTED_CHARS characters, and a whole message to MAX_MESSAGE_BYTES bytes of UTF-8.
MAX_QUOTED_CHARS = 64
MAX_MESSAGE_BYTES = 1024


def quote(value: str) -> str:
    """repr() of user input for an error message, cut to MAX_QUOTED_CHARS characters (the length said)."""
    if len(value) <= MAX_QUOTED_CHARS:
        return repr(value)
    return f"{value[:MAX_QUOTED_CHARS]!r}... ({len(value)} characters)"


def bounded(message: str) -> str:
    """The message cut to MAX_MESSAGE_BYTES bytes of UTF-8 (at a character boundary; lone surrogates, which
    cannot be sent, escaped)."""
    raw = message.encode(errors="backslashreplace")
    if len(raw) <= MAX_MESSAGE_BYTES:
        return raw.decode()
    return raw[: MAX_MESSAGE_BYTES - 3].decode(errors="ignore") + "..."


class AgentdError(Exception):
    """Base class: the message is shown to the caller as is (bounded in size)."""

    def __init__(self, message: str = "") -> None:
        super().__init__(bounded(message))


class InvalidArgument(AgentdError):
    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field


class NotFound(AgentdError):
    pass


class AlreadyExists(AgentdError):
    pass


class PermissionDenied(AgentdError):
    pass


class FailedPrecondition(AgentdError):
    pass


class ResourceExhausted(AgentdError):
    pass
