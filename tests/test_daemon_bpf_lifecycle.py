"""The lifecycle program inside the daemon: the exit status of a call's first process reaches the result and the
record when no client reports it, and the per-session process counters count exactly the session's own cgroups
(agent/ and its calls, ended ones included), nothing of other sessions or unmanaged processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from bpf_support import requires_root
from support import Daemon, create_session, scrape, spawn_in, value

from agentd.api.gen import agentd_pb2 as pb

pytestmark = requires_root

FORKER = "import os\nfor _ in range(3):\n    if os.fork() == 0:\n        os._exit(0)\n    os.wait()\n"  # 3 forks


def test_exit_status_from_the_kernel_without_a_report(daemon: Daemon, session: tuple[str, str]) -> None:
    sid, _ = session
    cases = (
        (["sh", "-c", "exit 3"], (3, 0), pb.OUTCOME_FAILED, "exited with status 3"),
        (["sh", "-c", "kill -USR1 $$"], (0, int(signal.SIGUSR1)), pb.OUTCOME_FAILED, "killed by signal 10"),
        (["true"], (0, 0), pb.OUTCOME_OK, "completed"),
    )
    with daemon.admin() as admin:
        for argv, (code, signum), outcome, feedback in cases:
            begun = admin.begin(pb.Intent(tool="unreported", argv=argv), sid, report_exit=False)
            os.waitpid(admin.spawn(begun, argv), 0)
            result = admin.wait(begun.call_id, timeout=10)
            assert (result.outcome, result.has_exit_status) == (outcome, True), argv
            assert (result.exit_code, result.exit_signal) == (code, signum), argv
            assert feedback in result.feedback and result.forks == 0
            record = daemon.record(begun.call_id)
            assert record["exit_status"] == {"code": code, "signal": signum}
            assert record["outcome"] == pb.Outcome.Name(outcome).removeprefix("OUTCOME_")


def counters(text: str, sid: str) -> tuple[float, float, float]:
    return tuple(  # type: ignore[return-value]
        value(text, f'agentd_session_process_events_total{{event="{event}",session="{sid}"}}')
        for event in ("fork", "exec", "exit")
    )


def test_process_counters_per_session(daemon: Daemon) -> None:
    with daemon.admin() as admin:
        busy, _ = create_session(admin)
        quiet, _ = create_session(admin)
        try:
            assert counters(scrape(daemon), busy) == counters(scrape(daemon), quiet) == (0, 0, 0)
            # In busy's agent/ leaf: one exec (the shell that moved itself there execs Python), 3 forks, 4 exits.
            agent = spawn_in(daemon.session_path(busy) / "agent", [sys.executable, "-c", FORKER])
            assert agent.wait(30) == 0
            # The same outside any session: filtered in the kernel.
            subprocess.run([sys.executable, "-c", FORKER], check=True, timeout=30)
            # A call of busy that has ended: its counts stay in the session's.
            ran = admin.run([sys.executable, "-c", FORKER], busy)
            assert ran.result.outcome == pb.OUTCOME_OK and ran.result.forks == 3

            text = scrape(daemon)
            assert counters(text, busy) == (6, 2, 8)
            assert counters(text, quiet) == (0, 0, 0)
            assert value(text, "agentd_bpf_events_lost_total") == 0
        finally:
            for sid in (busy, quiet):
                admin.call("DeleteSession", pb.DeleteSessionRequest(session_id=sid, force=True))
    assert busy not in scrape(daemon)  # a deleted session's counters go with it


def test_kernel_exit_status_ends_a_reporting_call_without_waiting(daemon_factory: object) -> None:
    """With report_exit, a call whose exit the kernel already reported is finalised when its cgroup empties,
    not after the grace period for the client's report."""
    import time

    d = daemon_factory(api={"exit_report_grace_seconds": 30.0}).start()  # type: ignore[operator]
    with d.admin() as admin:
        sid, _ = create_session(admin, "prompt")
        begun = admin.begin(pb.Intent(tool="exit5"), sid, report_exit=True)
        os.waitpid(admin.spawn(begun, ["sh", "-c", "exit 5"]), 0)
        started = time.monotonic()
        result = admin.wait(begun.call_id, timeout=20)
        assert time.monotonic() - started < 5
        assert (result.outcome, result.exit_code) == (pb.OUTCOME_FAILED, 5)
