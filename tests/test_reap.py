"""The reaper answers every call, even when the kernel refuses its accounting (in-process, real parts: records
on disk, an event loop, the housekeeping that follows)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agentd.core.housekeeping import Housekeeping
from agentd.core.intents import Intent, Limits
from agentd.core.network import NetworkIntent
from agentd.core.reap import Reaper
from agentd.core.records import RecordStore
from agentd.core.registry import Registry
from agentd.core.results import Outcome
from agentd.core.sessions import Session, SessionSpec
from agentd.core.spares import Spares
from agentd.core.toolcalls import CallState, ToolCall
from agentd.core.tracking import Tracking
from agentd.kernel.capabilities import Capabilities
from agentd.kernel.watch import Watcher


def test_a_call_whose_accounting_cannot_be_read_is_still_answered_and_recorded(tmp_path: Path) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        records = RecordStore(tmp_path / "records.jsonl", 1 << 20, 100)
        registry = Registry(records)
        watcher = Watcher(loop)
        tracking = Tracking(None, loop)
        network = NetworkIntent(None, False)
        housekeeping = Housekeeping(loop, registry, records, watcher, tracking, network, Spares())
        caps = Capabilities(cgroup_root=tmp_path, enforced={"memory"}, missing=set(), psi_triggers=False,
                            sched_ext=False)
        reaper = Reaper(caps, registry, records, tracking, network, housekeeping)
        session = Session(SessionSpec(id="s1"), tmp_path / "s1", "0" * 64, 0.0)
        registry.add_session(session)
        not_a_cgroup = tmp_path / "tc-abc"
        not_a_cgroup.write_text("a file: every read below it fails with ENOTDIR")
        call = ToolCall(id="abc", session_id="s1", intent=Intent(tool="t"), limits=Limits(1, 2, 100, 0, 10, 60.0, 1),
                        path=not_a_cgroup, cgroup_id=1, created=0.0, report_exit=False, confined=False)
        call.state, call.started, call.done = CallState.RUNNING, 1.0, loop.create_future()
        registry.add_call(session, call)
        result = reaper.finalise(call)
        assert result is not None and call.done.done() and call.done.result() is result
        assert result.outcome == Outcome.EXITED and result.memory_peak == -1
        assert "abc" not in registry.calls and "abc" not in session.calls
        housekeeping.flush()
        assert records.get("abc") is result
        housekeeping.close()
        watcher.close()
        records.close()

    asyncio.run(scenario())
    assert "abc" in (tmp_path / "records.jsonl").read_text()
