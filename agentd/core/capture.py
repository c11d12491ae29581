"""Auto-capture: an undeclared command exec'd in a session's agent/ leaf becomes an implicit tool call.

The lifecycle program reports every exec in an agent leaf; at once (a wakeup) only when the basename of
the exec'd file is a name in [capture] shells or commands, the others arrive batched and match no rule. A
rule decides whether it is captured, on the basename of the exec'd file: a shell running a command string
(`bash -c …`, `bash -lc …`: a name in [capture] shells whose first argument is an option cluster with c),
or a known heavy command ([capture] commands). agentd's own launcher (agentd.launch: a `sh -c` that waits
to be placed into a declared call) is never captured, nor is a process that left the agent leaf before
agentd got to it. The engine creates the call with the default intent for captured commands and moves the
process into it.

Capture is a convenience for agents that do not declare their commands, not a boundary: a process can
dodge it (e.g. by exec'ing under another name).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agentd.core.config import Config
from agentd.core.errors import AgentdError
from agentd.core.intents import Intent, Network
from agentd.core.sessions import CaptureMode, Session
from agentd.kernel import cgroupfs
from agentd.kernel.bpf.lifecycle import ProcessEvent
from agentd.launch import WAIT_THEN_EXEC

if TYPE_CHECKING:
    from agentd.core.engine import Engine

log = logging.getLogger(__name__)

SHELL, COMMAND = "shell", "command"
_COMMAND_STRING = re.compile(r"-[A-Za-z]*c[A-Za-z]*")  # -c, -lc, -ec, ...


@dataclass(frozen=True)
class Rules:
    shells: frozenset[str]
    commands: frozenset[str]

    def match(self, filename: str, argv: tuple[str, ...]) -> str | None:
        """The rule an exec matches (SHELL or COMMAND), or None."""
        if argv[1:3] == ("-c", WAIT_THEN_EXEC):
            return None  # the launcher of a declared call
        name = os.path.basename(filename)
        if name in self.shells and len(argv) > 1 and _COMMAND_STRING.fullmatch(argv[1]):
            return SHELL
        return COMMAND if name in self.commands else None

    def names(self) -> frozenset[str]:
        """The basenames an exec needs for match() to return a rule (the kernel's wakeup prefilter)."""
        return self.shells | self.commands


class AutoCapture:
    """Listens to execs in agent leaves and has the engine capture the matching ones."""

    def __init__(self, engine: Engine, config: Config) -> None:
        self.engine = engine
        self.rules = Rules(config.capture_shells, config.capture_commands)
        self.default_on = config.capture_enabled
        self.network = Network.NONE if config.capture_network == "none" else Network.ANY
        self.timeout_seconds = config.capture_timeout_seconds
        engine.tracking.on_agent_exec = self.on_exec
        engine.tracking.wants_execs = self.enabled_for  # sessions added from now on: made or adopted after this
        engine.tracking.wake_on_exec_of(self.rules.names())

    def enabled_for(self, session: Session) -> bool:
        mode = session.spec.capture
        return mode == CaptureMode.ON or (mode == CaptureMode.UNSPECIFIED and self.default_on)

    def on_exec(self, session: Session, event: ProcessEvent) -> None:
        if session.deleting or not self.enabled_for(session):
            return
        rule = self.rules.match(event.filename, event.argv)
        if rule is None:
            return
        intent = Intent(
            tool=os.path.basename(event.filename),
            argv=(*event.argv, "…") if event.argv_truncated else event.argv,
            timeout_seconds=self.timeout_seconds,
            network=self.network,
        )
        try:
            call = self.engine.capture(session, event.tgid, intent, rule, event.timestamp_ns)
        except (AgentdError, cgroupfs.CgroupError) as exc:
            log.warning("command not captured", extra={"session": session.id, "pid": event.tgid, "error": str(exc)})
            return
        if call is not None:
            log.debug("captured", extra={"session": session.id, "pid": event.tgid, "call": call.id, "rule": rule})
