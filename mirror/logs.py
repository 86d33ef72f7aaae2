"""Log set-up: plain text or one JSON object per line (`log_format: json`).

The mirror never logs headers or credentials: log lines carry methods, paths (which hold
no secrets), statuses, sizes, timings and upstream names only.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

# Fields an access line carries, besides the message; set through `extra=`.
ACCESS_FIELDS = ("remote", "method", "path", "status", "bytes", "duration", "result", "upstream")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ACCESS_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    logging.getLogger("aiohttp.access").disabled = True  # our own access line replaces it
