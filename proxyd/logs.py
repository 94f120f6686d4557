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
