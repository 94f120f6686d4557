"""The master's admin listener: /metrics, /healthz, /readyz, /status.

Served from the master's own select loop with non-blocking sockets: no thread (the master
forks workers, and forking a threaded process is unsafe) and no blocking read (a slow
scraper must not stall supervision). Each connection gets one request, a deadline, a
size limit, and ``Connection: close``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

_HEAD_LIMIT = 8192
_DEADLINE = 5.0
_MAX_CONNECTIONS = 64

Handler = Callable[[str, str], tuple[int, str, bytes]]
"""(method, path) -> (status, content type, body)."""

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}


@dataclass
class _Conn:
    sock: socket.socket
    deadline: float
    inbuf: bytes = b""
    out: bytes = b""


class AdminServer:
    """A minimal HTTP/1.1 server driven by the caller's select loop."""

    def __init__(self, sock: socket.socket, handler: Handler) -> None:
        self.sock = sock
        self.handler = handler
        self.conns: dict[int, _Conn] = {}

    def read_fds(self) -> list[int]:
        """Descriptors to watch for reading."""
        fds = [c.sock.fileno() for c in self.conns.values() if not c.out]
        if len(self.conns) < _MAX_CONNECTIONS:
            fds.append(self.sock.fileno())
        return fds

    def write_fds(self) -> list[int]:
        """Descriptors with a response still to send."""
        return [c.sock.fileno() for c in self.conns.values() if c.out]

    def handle(self, readable: list[int], writable: list[int]) -> None:
        """Process readiness reported by select()."""
        if self.sock.fileno() in readable:
            self._accept()
        for fd in list(self.conns):
            conn = self.conns.get(fd)
            if conn is None:
                continue
            if fd in readable and not conn.out:
                self._read(fd, conn)
            elif fd in writable and conn.out:
                self._write(fd, conn)
        self._expire()

    def _accept(self) -> None:
        try:
            sock, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        sock.setblocking(False)
        self.conns[sock.fileno()] = _Conn(sock, time.monotonic() + _DEADLINE)

    def _read(self, fd: int, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(_HEAD_LIMIT + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(fd)
            return
        if not data:
            self._close(fd)
            return
        conn.inbuf += data
        end = conn.inbuf.find(b"\r\n\r\n")
        if end == -1:
            if len(conn.inbuf) > _HEAD_LIMIT:
                conn.out = _response(431, "text/plain", b"request head too large\n", False)
                self._write(fd, conn)
            return
        conn.out = self._respond(conn.inbuf[:end])
        self._write(fd, conn)

    def _respond(self, head: bytes) -> bytes:
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _response(400, "text/plain", b"bad request\n", False)
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            # RFC 9110 §15.5.6: a 405 MUST list the methods the target supports in Allow.
            return _response(405, "text/plain", b"only GET and HEAD\n", False,
                             b"Allow: GET, HEAD\r\n")
        status, ctype, body = self.handler(method, target.split("?", 1)[0])
        return _response(status, ctype, body, method == "HEAD")

    def _write(self, fd: int, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(fd)
            return
        conn.out = conn.out[sent:]
        if not conn.out:
            self._close(fd)

    def _expire(self) -> None:
        now = time.monotonic()
        for fd, conn in list(self.conns.items()):
            if now > conn.deadline:
                self._close(fd)

    def _close(self, fd: int) -> None:
        conn = self.conns.pop(fd, None)
        if conn is not None:
            conn.sock.close()

    def close(self) -> None:
        """Close the listener and every connection."""
        for fd in list(self.conns):
            self._close(fd)
        self.sock.close()


def _response(status: int, ctype: str, body: bytes, head_only: bool,
              extra: bytes = b"") -> bytes:
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n").encode() + extra + b"\r\n"
    return head if head_only else head + body
