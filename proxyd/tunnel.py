"""CONNECT tunnels (RFC 9110 §9.3.6): a raw byte pipe, never pooled.

After a 2xx to CONNECT both directions are opaque; each side's EOF is passed on as a
half-close, and back-pressure works both ways.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from .upstream import map_connect_error

if TYPE_CHECKING:
    from .client import ClientConnection

_PENDING_LIMIT = 262144  # bytes from the client held while the tunnel is still connecting


class Tunnel:
    """The upstream half of one client's CONNECT tunnel."""

    def __init__(self, client: ClientConnection, host: str, port: int) -> None:
        self.client = client
        self.host = host
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.client_eof_pending = False
        self.client_done = False  # the client half-closed its sending side
        self.target_done = False  # the target half-closed its sending side
        self.closed = False
        self.error = ""  # why the tunnel ended abnormally (RFC 9209 type), for the access log
        self._task: asyncio.Task[None] | None = None

    def start(self, early: bytes) -> None:
        """Connect in the background; ``early`` holds bytes sent after the CONNECT head."""
        if early:
            self.from_client(early)
        self._task = asyncio.ensure_future(self._open())

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.client.worker.timeouts.connect
        try:
            async with asyncio.timeout(timeout):
                sock = await self.client.worker.connector.connect_tcp(loop, self.host, self.port)
                transport, _ = await loop.create_connection(lambda: _TunnelPeer(self), sock=sock)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.client.tunnel_failed(map_connect_error(exc, self.host, self.port, "connect"))
            return
        if self.closed:
            transport.close()
            return
        self.transport = transport  # type: ignore[assignment]
        self.client.tunnel_established()
        if self.pending:
            transport.writelines(self.pending)  # type: ignore[attr-defined]
            self.pending = []
            self.client.resume_tunnel_reading()
        if self.client_eof_pending:
            _half_close(transport)  # type: ignore[arg-type]

    def from_client(self, data: bytes) -> None:
        """Bytes from the client towards the target."""
        self.client.deadline = time.monotonic() + self.client.worker.timeouts.tunnel_idle
        self.client.bytes_in += len(data)
        if self.transport is not None:
            self.transport.write(data)
            return
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size > _PENDING_LIMIT:
            self.client.pause_tunnel_reading()

    def client_eof(self) -> bool:
        """The client half-closed; pass it on and keep the other direction open."""
        self.client_done = True
        if self.transport is None:
            self.client_eof_pending = True
        else:
            _half_close(self.transport)
        if self.target_done:
            self._both_done()
        return True

    def to_client(self, data: bytes) -> None:
        """Bytes from the target towards the client."""
        self.client.deadline = time.monotonic() + self.client.worker.timeouts.tunnel_idle
        client = self.client
        client.bytes_out += len(data)
        client.worker.stats.bytes_to_clients += len(data)
        transport = client.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def target_eof(self) -> bool:
        """The target half-closed; pass it on to the client."""
        self.target_done = True
        transport = self.client.transport
        if self.client_done:
            self._both_done()
            return False
        if transport is not None and transport.can_write_eof() and not transport.is_closing():
            transport.write_eof()
            return True
        return False

    def _both_done(self) -> None:
        # Both directions ended: asyncio does not close half-closed transports by itself.
        self.client.tunnel_closed()
        self.close()

    def pause_upstream(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_upstream(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def close(self) -> None:
        """Tear the tunnel down (the client went away)."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        elif self._task is not None:
            self._task.cancel()


def _half_close(transport: asyncio.Transport) -> None:
    """Pass the client's half-close on to the target. A target that reset meanwhile has no
    sending side left to shut (asyncio raises ENOTCONN): the tunnel is over, so abort it
    rather than let the error surface as a traceback in the log."""
    if not transport.can_write_eof():
        return
    try:
        transport.write_eof()
    except OSError:
        transport.abort()


class _TunnelPeer(asyncio.Protocol):
    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel

    def data_received(self, data: bytes) -> None:
        self.tunnel.to_client(data)

    def eof_received(self) -> bool:
        return self.tunnel.target_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.client.tunnel_closed(exc)

    def pause_writing(self) -> None:
        self.tunnel.client.pause_tunnel_reading()

    def resume_writing(self) -> None:
        self.tunnel.client.resume_tunnel_reading()
