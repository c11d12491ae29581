"""Structured logging to stderr (journald keeps it): one JSON object per line, extra fields included."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


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
                plain = isinstance(value, str | int | float | bool | None | dict | list | tuple)
                data[key] = value if plain else str(value)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter (grpc's per-loop debug lines, asyncio's selector) stays out of agentd's debug log.
    for name in ("grpc", "asyncio"):
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))
