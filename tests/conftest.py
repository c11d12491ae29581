"""Shared fixtures: a real daemon per module, private sessions per test, cleanup even on failure."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import Daemon, create_session

from agentd.api.gen import agentd_pb2 as pb


def pytest_configure(config: pytest.Config) -> None:
    """Tests send SIGINT to the processes they start (agentctl watch, top's Ctrl-C, the launcher's relay). A shell
    without job control starts a background job with SIGINT ignored, which exec keeps: caught here instead, the
    processes the tests start get the default disposition, as from an interactive shell."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("agentd"))
    try:
        yield d.start()
    finally:
        d.cleanup()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Daemons owned by one test (for restarts and custom config); all cleaned up afterwards."""
    made: list[Daemon] = []

    def make(**overrides: dict[str, Any]) -> Daemon:
        workdir = tmp_path / f"d{len(made)}"
        workdir.mkdir()
        made.append(Daemon(workdir, **overrides))
        return made[-1]

    try:
        yield make
    finally:
        for d in reversed(made):
            d.cleanup()


@pytest.fixture
def session(daemon: Daemon, request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """A fresh session (id, token) on the module's daemon, deleted (force) after the test."""
    with daemon.admin() as admin:
        sid, token = create_session(admin, priority=pb.PRIORITY_NORMAL)
    try:
        yield sid, token
    finally:
        with daemon.admin() as admin:
            if sid in {s.spec.id for s in admin.call("ListSessions", pb.ListSessionsRequest()).sessions}:
                admin.call("DeleteSession", pb.DeleteSessionRequest(session_id=sid, force=True))
