"""Structured logging to stderr (journald keeps it): one JSON object per line, extra fields included.

Every decision of the daemon logs a line, several per tool call: formatting is on the hot path, so the records
carry only what the line shows (no caller lookup, thread or process names: the JSON has none of them).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

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


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
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
