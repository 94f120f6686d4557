"""Logging as logfmt lines on stderr (journald keeps them; machines and people read them)."""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Any


# Control characters never reach a log line raw: one event stays one line, and a value
# cannot fake another field or line (a CR, an ESC sequence for a terminal).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_control(m: re.Match[str]) -> str:
    c = m.group()
    return _CONTROL_ESCAPES.get(c) or f"\\x{ord(c):02x}"


def _quote(value: Any) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\\') and _CONTROL.search(text) is None:
        return text
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + _CONTROL.sub(_escape_control, text) + '"'


# syslog priorities (RFC 5424 §6.2.1) of the logging levels, for journald's level prefix.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


def stderr_is_journal(environ: dict[str, str] | None = None) -> bool:
    """True when stderr is connected to journald: systemd then sets ``JOURNAL_STREAM`` to the
    device and inode of that stream (systemd.exec(5))."""
    env = os.environ if environ is None else environ
    dev, _, ino = env.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class LogfmtFormatter(logging.Formatter):
    """``ts=... level=info pid=123 logger=proxyd.pool msg="..." key=value ...``.

    Extra fields come from ``extra={"fields": {...}}``. Under journald each line starts with
    its syslog priority (``<4>`` for a warning: sd-daemon(3)), so that ``journalctl -p
    warning`` finds proxyd's warnings; the prefix is not stored in the message.
    """

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>" if self.journal else ""
        parts = [f"{prefix}ts={ts}.{int(record.msecs):03d}Z", f"level={record.levelname.lower()}",
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
    handler.setFormatter(LogfmtFormatter(journal=stderr_is_journal()))
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
