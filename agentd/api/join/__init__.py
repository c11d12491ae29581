"""The join socket: processes are placed into tool calls here, identified by the kernel, never by a claimed pid.

One line per request and per answer, on a Unix stream socket:

    HOLD <ref>     + SCM_RIGHTS fd  offer the process the pidfd refers to (held before exec) for the
                                    BeginToolCall whose held_process is <ref>, sent right after; no answer here:
                                    that request places it or fails (a malformed HOLD closes the connection)
    JOIN <token>                    place the connecting process itself (pid from SO_PEERCRED)
    JOIN <token>   + SCM_RIGHTS fd  place the process the attached pidfd refers to (e.g. a forked child that
                                    waits for the answer before it execs); the sender must be allowed too
      -> OK <call id> | ERR <CODE> <message>
    END <call id> <wait status|->   only for a call placed on this connection: the tool's wait status;
      -> RESULT <base64 ToolCallResult> | ERR <CODE> <message>     (answered once the call is finalised)

Framed protocol (the hot path of a declared tool call; layout and kinds in proto/agentd.proto, above JoinHello):
a connection whose first byte is 0 speaks length-prefixed frames whose payloads are the API's protobuf messages.
HELLO (JoinHello: version, session token) first; BEGIN (BeginToolCallRequest + the pidfd of the held process)
-> BEGUN (BeginToolCallResponse) | ERROR (JoinError); END (EndToolCallRequest) -> RESULT (ToolCallResult) |
ERROR. BEGIN is the Sandbox service's BeginToolCall (agentd.api.servicer: the same authorization, validation,
admission and placement); its pidfd counts as a HOLD for the quotas below while it is handled. Requests are
handled one at a time, in order: while one is, nothing more is read. A frame's length outside 1..MAX_FRAME,
an undecodable HELLO, a wrong version, a first frame that is not HELLO or a descriptor not alone with the end of
a BEGIN frame gets an ERROR (a descriptor: none) and closes the connection; a bad BEGIN or END is answered
with an ERROR and the connection stays. A framed connection with calls awaiting their END is not closed
for idleness (their tools may run for hours); it holds no descriptor meanwhile.

HOLD lets a launcher place its child before exec without running code in the child and without a round trip
of its own, and keeps the connection for END: a tool call costs one gRPC round trip (BeginToolCall, which
places the child) plus one on this socket. The sender of a HOLD and its process are checked at placement
exactly as for JOIN. Every request gets its answer: an unexpected failure is `ERR INTERNAL <message>`. The
codes are those of gRPC (agentd.api.status).

Limits. The socket is world-connectable and bind-mounted into every sandbox: no peer may take more than a
bounded share of agentd's descriptors or HOLD slots, and one owner's abuse must not block another's calls.
A connection belongs to an owner, identified once when it is accepted: the session whose cgroups hold the
connecting process (SO_PEERCRED pid -> cgroup, agentd.core.owners), or "uid:<uid>" for a process outside every
session; a connection whose process has exited by then is refused.
- Descriptors travel with the line they belong to. A read accepts room for one descriptor (a message with more
  is cut, MSG_CTRUNC), and a message carrying one must end its line, a HOLD or a JOIN. Anything else closes the
  connection and the descriptors at once: no descriptor ever waits in agentd for a later read.
- Per owner: MAX_CONNECTIONS_PER_OWNER connections (beyond: `ERR RESOURCE_EXHAUSTED`, closed) and
  MAX_HELD_PER_OWNER unclaimed HOLDs; per connection MAX_HELD_PER_CONNECTION. A HOLD beyond a quota closes its
  connection, and the BeginToolCall naming it is refused at once with RESOURCE_EXHAUSTED.
- In all: [api] max_connections connections and MAX_HELD unclaimed HOLDs, backstops far above one owner's share.
- A connection remembers the calls placed on it until their END (an END forgets its call), the newest
  MAX_PLACED_PER_CONNECTION of them: for an older one END answers PERMISSION_DENIED (EndToolCall still works).
An owner therefore holds at most MAX_CONNECTIONS_PER_OWNER + MAX_HELD_PER_OWNER of agentd's descriptors, plus
one for the read being handled.

The package, one job a module: wire (the bytes on the socket: lines, frames, wait statuses, descriptors), limits
(the quotas and timeouts above, and the refusals under them; read there at call time, so a test patches them
there), contract (the callables the server is given, HoldRefused, PlacementRefused), connection (one
connection's state machine and the line protocol), framed (the framed protocol's requests on a connection),
eager (a request run at once up to its first wait, a task only for one that waits), readiness (one epoll for
every connection's reads), server (JoinServer: listening, admission, the idle check, the held processes).
"""

from agentd.api.join.contract import (
    Beginner,
    Ender,
    HoldRefused,
    Identify,
    PlacementRefused,
    Placer,
)
from agentd.api.join.limits import (
    ACCEPT_PAUSE_SECONDS,
    ACCEPTS_PER_WAKEUP,
    HOLD_WAIT_SECONDS,
    IDLE_TIMEOUT_SECONDS,
    LOG_INTERVAL_SECONDS,
    MAX_CONNECTIONS_PER_OWNER,
    MAX_HELD,
    MAX_HELD_PER_CONNECTION,
    MAX_HELD_PER_OWNER,
    MAX_PLACED_PER_CONNECTION,
    MAX_REFUSED_REMEMBERED,
    Usage,
    connection_refusal,
    hold_refusal,
)
from agentd.api.join.server import (
    Held,
    JoinServer,
)
from agentd.api.join.wire import (
    BEGIN,
    BEGUN,
    END,
    ERROR,
    EXPECTED,
    FRAME_HEADER,
    FRAME_READ_SIZE,
    FRAME_VERSION,
    HELLO,
    MAX_FRAME,
    MAX_LINE,
    MAX_REF,
    READ_SIZE,
    RESULT,
    decode,
    descriptor_fault,
    frame,
    frame_descriptor_fault,
    parse_wait_status,
    pidfd_pid,
    split_frames,
    wait_status_of,
)

__all__ = [
    "ACCEPTS_PER_WAKEUP",
    "ACCEPT_PAUSE_SECONDS",
    "BEGIN",
    "BEGUN",
    "END",
    "ERROR",
    "EXPECTED",
    "FRAME_HEADER",
    "FRAME_READ_SIZE",
    "FRAME_VERSION",
    "HELLO",
    "HOLD_WAIT_SECONDS",
    "IDLE_TIMEOUT_SECONDS",
    "LOG_INTERVAL_SECONDS",
    "MAX_CONNECTIONS_PER_OWNER",
    "MAX_FRAME",
    "MAX_HELD",
    "MAX_HELD_PER_CONNECTION",
    "MAX_HELD_PER_OWNER",
    "MAX_LINE",
    "MAX_PLACED_PER_CONNECTION",
    "MAX_REF",
    "MAX_REFUSED_REMEMBERED",
    "READ_SIZE",
    "RESULT",
    "Beginner",
    "Ender",
    "Held",
    "HoldRefused",
    "Identify",
    "JoinServer",
    "PlacementRefused",
    "Placer",
    "Usage",
    "connection_refusal",
    "decode",
    "descriptor_fault",
    "frame",
    "frame_descriptor_fault",
    "hold_refusal",
    "parse_wait_status",
    "pidfd_pid",
    "split_frames",
    "wait_status_of",
]
