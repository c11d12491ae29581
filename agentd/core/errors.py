"""Errors the core raises; the API layer maps each to one gRPC status code."""

from __future__ import annotations


class AgentdError(Exception):
    """Base class: the message is shown to the caller as is."""


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
