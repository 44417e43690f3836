"""The one log setup of every nhigate process: one JSON object per line on stderr.

Audit records are not logs: the proxy writes them through its own audit writer.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import orjson

# Libraries that log at INFO per event or dump tracebacks for input we already audit.
QUIET_LOGGERS = {
    "kopf.objects": logging.WARNING,  # one line per handled watch event
    "aiohttp.access": logging.WARNING,  # the audit log is the access log
    "aiohttp.server": logging.CRITICAL,  # parser refusals: audited, and a traceback per attack
}


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "msg"[, "error"]}`, parseable by any log pipeline."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, str] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def setup_logging(level: str) -> None:
    """Send every log record as a JSON line to stderr at `level` (e.g. "INFO")."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name, quiet_level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(quiet_level)
