"""The pid a pidfd sent to the join socket refers to, as the kernel tells it: a live or exited (not yet reaped)
process's pid, -1 once it is reaped, an error for a descriptor that is not a pidfd."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

import pytest

from agentd.api.join.wire import fdinfo_pid, pidfd_pid
from agentd.core.errors import FailedPrecondition


@pytest.mark.parametrize("read", [pidfd_pid, fdinfo_pid])
def test_a_pidfd_gives_its_process_pid_until_it_is_reaped(read: Callable[[int], int]) -> None:
    child = subprocess.Popen(["sleep", "60"])
    pidfd = os.pidfd_open(child.pid)
    try:
        assert read(pidfd) == child.pid
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        assert read(pidfd) == child.pid
        child.wait()
        assert read(pidfd) == -1
    finally:
        child.kill()
        child.wait()
        os.close(pidfd)


def test_a_descriptor_that_is_not_a_pidfd_is_refused() -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(FailedPrecondition, match="not a pidfd"):
            pidfd_pid(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
