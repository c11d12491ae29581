"""Structured logging to stderr (journald keeps it): one JSON object per line, extra fields included.

Every decision of the daemon logs a line, several per tool call: formatting is on the hot path, so the records
carry only what the line shows (no caller lookup, thread or process names: the JSON has none of them).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_PLAIN = (str, int, float, bool, type(None), dict, list, tuple)  # a tuple: isinstance of a union is slower
_ENCODER = json.JSONEncoder(default=str)  # what json.dumps(default=str) would build for every line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                data[key] = value if isinstance(value, _PLAIN) else str(value)
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
