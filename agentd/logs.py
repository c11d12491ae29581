"""Structured logging to stderr (journald keeps it): one JSON object per line, extra fields included.

Every decision of the daemon logs a line, several per tool call: formatting is on the hot path, so the records
carry only what the line shows (no caller lookup, thread or process names: the JSON has none of them), and the
lines a turn of the event loop logs are formatted and written after that turn (TurnHandler): the answers it
sends go first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any, TextIO

# What every record is made with (LogRecord.__init__): a record's extra fields come after these (makeRecord adds
# them, and refuses their names), followed at most by what a formatter may set later (message, asctime).
_MADE_WITH = frozenset(logging.makeLogRecord({}).__dict__)
_LATER = frozenset({"message", "asctime"})
# A value JSON has no type for is written as its str() (a Path, an exception), as before the encoder sees it.
_ENCODER = json.JSONEncoder(default=str)  # what json.dumps(default=str) would build for every line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = record.__dict__
        extra = []
        for key in reversed(fields):  # a line has a dozen extra fields, a record two dozen others before them
            if key in _MADE_WITH:
                break
            if key not in _LATER:
                extra.append(key)
        for key in reversed(extra):
            data[key] = fields[key]
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return _ENCODER.encode(data)


class TurnHandler(logging.StreamHandler[TextIO]):
    """Writes the lines logged by the callbacks of one turn of the event loop right after them, in one write.

    Formatting and writing a line costs ~60 µs on a 2-vCPU host, and a tool call's begin and end each log one on
    the way to their answers; deferred by one turn, the answer is sent first. Order is kept: a line logged
    outside the loop's thread, or with no loop running (start-up, shutdown), writes those pending first, then
    itself. flush() (logging.shutdown at exit) writes what is pending. A line is lost only if the process dies
    within the turn that logged it, before its write: as a process killed in the middle of a write would lose it."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:  # called with the handler's lock held
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write_pending()
            super().emit(record)
            return
        self._pending.append(record)
        if len(self._pending) == 1:
            loop.call_soon(self._write_pending)

    def flush(self) -> None:
        self._write_pending()
        super().flush()

    def _write_pending(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # made by Handler.__init__
            pending, self._pending = self._pending, []
            if not pending:
                return
            lines = []
            for record in pending:
                try:
                    lines.append(self.format(record) + self.terminator)
                except Exception:
                    self.handleError(record)
            try:
                self.stream.write("".join(lines))
                super().flush()
            except Exception:
                self.handleError(pending[0])


def configure(level: str) -> None:
    handler = TurnHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter (grpc's per-loop debug lines, asyncio's selector) stays out of agentd's debug log.
    for name in ("grpc", "asyncio"):
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))
    # What a record gathers that no line shows (the logging documentation's "Optimization"): the caller's file
    # and line (a walk up the stack per record), the thread's, process's and multiprocessing's names.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
