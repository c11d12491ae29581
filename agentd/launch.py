"""The launcher: start a command held before exec, so that agentd can place it into a tool call first.

The launched child is a shell that waits on fd 3 for "go" (sent once agentd has placed it), then execs the
command in place: the same pid, nothing run in between. posix_spawn (vfork) avoids copying the caller's
address space, and no Python runs in the child. The daemon recognises the waiting shell by its script
(WAIT_THEN_EXEC) and never auto-captures it: it is about to be placed into a declared call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

WAIT_THEN_EXEC = 'read -r go <&3 && [ "$go" = go ] || exit 126; exec 3<&-; exec "$@"'


def launch(argv: Sequence[str]) -> tuple[int, int]:
    """Start argv held before exec; returns (pid, fd to release it with)."""
    read_fd, write_fd = os.pipe()
    try:
        pid = os.posix_spawn(
            "/bin/sh", ["sh", "-c", WAIT_THEN_EXEC, "sh", *argv], os.environ,
            file_actions=[(os.POSIX_SPAWN_DUP2, read_fd, 3)],
        )
    except BaseException:
        os.close(write_fd)
        raise
    finally:
        os.close(read_fd)
    return pid, write_fd


def release(go: int) -> None:
    """Let a launched child exec its command."""
    try:
        os.write(go, b"go\n")
    finally:
        os.close(go)
