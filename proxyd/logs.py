"""Logging as logfmt lines on stderr (journald keeps them; machines and people read them)."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any


def _quote(value: Any) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\\\n\t'):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogfmtFormatter(logging.Formatter):
    """``ts=... level=info pid=123 logger=proxyd.pool msg="..." key=value ...``.

    Extra fields come from ``extra={"fields": {...}}``.
    """

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"ts={ts}.{int(record.msecs):03d}Z", f"level={record.levelname.lower()}",
                 f"pid={record.process}", f"logger={record.name}", f"msg={_quote(record.getMessage())}"]
        fields = getattr(record, "fields", None)
        if fields:
            parts.extend(f"{k}={_quote(v)}" for k, v in fields.items())
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def setup(level: str) -> None:
    """Send proxyd's logs to stderr as logfmt at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger("proxyd")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    logging.raiseExceptions = bool(os.environ.get("PROXYD_DEBUG"))


class RateLimited:
    """Warnings of one kind, at most ``per_second`` a second; the rest are counted and
    reported in one line when the next second's first warning is written.

    Why: a failing origin under load fails every request; like nginx, proxyd says why in
    its log, but a flood would drown everything else (the access log already has a line
    per request).
    """

    def __init__(self, logger: logging.Logger, per_second: int = 10) -> None:
        self._log = logger
        self._limit = per_second
        self._window = 0.0
        self._count = 0
        self._dropped = 0

    def warning(self, msg: str, *args: Any, fields: dict[str, Any] | None = None) -> None:
        """Log ``msg % args`` at warning level unless this second's budget is spent."""
        now = time.monotonic()
        if now - self._window >= 1.0:
            if self._dropped:
                self._log.warning("%d more like the last one not logged in the second before",
                                  self._dropped)
            self._window = now
            self._count = 0
            self._dropped = 0
        if self._count >= self._limit:
            self._dropped += 1
            return
        self._count += 1
        self._log.warning(msg, *args, extra={"fields": fields or {}})
