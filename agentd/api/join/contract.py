"""What the join socket and the daemon serving it hand each other: the callables the server is given (place,
end and begin a call, identify a connection's owner) and the exceptions that cross between them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from agentd.api.gen import agentd_pb2 as pb
from agentd.core.errors import AgentdError, ResourceExhausted

# (token, sender pid, target pid or None for the sender itself) -> call id
Placer = Callable[[str, int, int | None], str]
# (call id, wait status or None) -> result
Ender = Callable[[str, int | None], Awaitable[pb.ToolCallResult]]
# (request, session token, sender pid, pidfd, called with the call id once placed) -> the answer; raises
# PlacementRefused when the process could not be placed
Beginner = Callable[[pb.BeginToolCallRequest, str, int, int, Callable[[str], None]],
                    Awaitable[pb.BeginToolCallResponse]]
# (pid, uid) of a connecting process -> its owner ("session:<id>", "uid:<uid>"); None once it has exited
Identify = Callable[[int, int], str | None]


class HoldRefused(ResourceExhausted):
    """The HOLD a BeginToolCall names was refused: its owner was at a quota."""


class PlacementRefused(Exception):
    """A BeginToolCall's held process could not be placed (`cause`): the command never ran, no call is left."""

    def __init__(self, cause: AgentdError) -> None:
        super().__init__(str(cause))
        self.cause = cause
