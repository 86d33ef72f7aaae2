"""Log set-up: plain text or one JSON object per line (`log_format: json`).

The mirror never logs headers or credentials: log lines carry methods, paths (which hold
no secrets), statuses, sizes, timings and upstream names only.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

# Fields an access line carries, besides the message; set through `extra=`.
ACCESS_FIELDS = (
    "remote",
    "method",
    "path",
    "status",
    "bytes",
    "complete",
    "duration",
    "result",
    "upstream",
    "user",  # with access rules: the client's user name, or "-"
    "access",  # with access rules: allowed, token, or refused:<reason>
    "agent",  # the client's User-Agent (which docker, containerd, kubelet asked)
)


def printable(text: str) -> str:
    """`text` with control characters escaped (a path with %0a must not start a forged
    log line) and at most 1,000 characters of it."""
    if len(text) > 1000:
        text = text[:1000] + "..."
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


class MalformedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse (an over-long header, a broken request line)
    with a whole traceback; one line names the client and the problem instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "-"
            record.msg = "malformed request from %s: %s"
            record.args = (remote, printable(str(error.message)))
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            # UTC with milliseconds, as log pipelines parse it (RFC 3339)
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
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
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequests) for f in server.filters):
        server.addFilter(MalformedRequests())
