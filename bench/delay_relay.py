#!/usr/bin/env python3
"""A TCP relay that adds a fixed one-way delay in each direction: a WAN in a box.

    delay_relay.py --listen 127.0.0.1:0 --target 127.0.0.1:8443 --delay-ms 10

Prints ``ready 127.0.0.1:PORT`` on stdout once it listens, then relays every accepted
connection to ``--target``. Bytes going either way are delivered ``--delay-ms`` after they
arrived (order kept, EOF and close delayed too), so a request/response exchange costs one
round trip of 2 × delay.

The TCP handshake to the relay itself completes locally and at once, which a real path
would not do: by default the relay therefore also holds a new connection's first
client-to-server bytes until one round trip after the accept (``--no-handshake-rtt`` turns
this off). With it, a fresh TLS 1.3 request costs what it costs on a real 20 ms path:
TCP (1 RTT) + TLS (1 RTT) + request (1 RTT).

Flow control: reading from a side pauses while more than ``--max-inflight`` bytes are in
flight towards the other side or its socket buffer is full.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal
import socket
import sys

_EOF = object()    # deliver a half-close (write_eof)
_CLOSE = object()  # deliver a full close


class Pipe:
    """One direction: data from ``src`` delivered to ``dst`` ``delay`` seconds later."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float, max_inflight: int) -> None:
        self.loop = loop
        self.delay = delay
        self.max_inflight = max_inflight
        self.queue: collections.deque[tuple[float, object]] = collections.deque()
        self.inflight = 0
        self.last_when = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.src: Side | None = None
        self.dst: Side | None = None   # its transport may not exist yet (connecting)
        self.done = False

    def push(self, item: object, not_before: float = 0.0) -> None:
        when = max(self.loop.time(), not_before) + self.delay
        when = max(when, self.last_when)   # never reorder
        self.last_when = when
        self.queue.append((when, item))
        if isinstance(item, bytes):
            self.inflight += len(item)
            if self.inflight > self.max_inflight and self.src is not None:
                self.src.pause(self)
        self._schedule()

    def _schedule(self) -> None:
        if self.timer is None and self.queue and self.dst is not None and self.dst.transport:
            self.timer = self.loop.call_at(self.queue[0][0], self._flush)

    def ready(self) -> None:
        """The destination transport exists now."""
        self._schedule()

    def _flush(self) -> None:
        self.timer = None
        dst = self.dst
        if dst is None or dst.transport is None:
            return
        # asyncio runs timers up to one clock resolution early; deliver what is due.
        now = self.loop.time() + 0.0002
        while self.queue and self.queue[0][0] <= now:
            _, item = self.queue.popleft()
            if isinstance(item, bytes):
                self.inflight -= len(item)
                if not dst.transport.is_closing():
                    dst.transport.write(item)
            elif item is _EOF:
                if not dst.transport.is_closing() and dst.transport.can_write_eof():
                    dst.transport.write_eof()
            else:  # _CLOSE
                self.done = True
                dst.transport.close()
        if self.src is not None and self.inflight <= self.max_inflight // 4:
            self.src.resume(self)
        self._schedule()


class Side(asyncio.Protocol):
    """One TCP connection of a relayed pair (the client side or the upstream side)."""

    def __init__(self, out: Pipe, back: Pipe, first_data_not_before: float = 0.0) -> None:
        self.out = out      # pipe carrying what this side receives
        self.back = back    # pipe delivering to this side
        self.transport: asyncio.Transport | None = None
        self.not_before = first_data_not_before
        self.pausers: set[Pipe] = set()
        self.write_paused = False
        out.src = self
        back.dst = self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.back.ready()

    def data_received(self, data: bytes) -> None:
        self.out.push(data, self.not_before)

    def eof_received(self) -> bool:
        self.out.push(_EOF, self.not_before)
        return True  # keep the other direction open (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.out.done:
            self.out.push(_CLOSE, self.not_before)

    # flow control: pause reading while the other direction cannot keep up
    def pause(self, reason: object) -> None:
        if not self.pausers and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self.pausers.add(reason)  # type: ignore[arg-type]

    def resume(self, reason: object) -> None:
        if reason in self.pausers:
            self.pausers.discard(reason)  # type: ignore[arg-type]
            if not self.pausers and self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def pause_writing(self) -> None:
        if self.back.src is not None:
            self.back.src.pause(self)

    def resume_writing(self) -> None:
        if self.back.src is not None:
            self.back.src.resume(self)


class Relay:
    def __init__(self, target: tuple[str, int], delay: float, handshake_rtt: bool,
                 max_inflight: int) -> None:
        self.target = target
        self.delay = delay
        self.handshake_rtt = handshake_rtt
        self.max_inflight = max_inflight
        self.connections = 0

    def client_side(self) -> Side:
        loop = asyncio.get_running_loop()
        up = Pipe(loop, self.delay, self.max_inflight)     # client -> target
        down = Pipe(loop, self.delay, self.max_inflight)   # target -> client
        # The client's first bytes could leave only after a SYN/SYN-ACK round trip.
        not_before = loop.time() + 2 * self.delay if self.handshake_rtt else 0.0
        client = Side(up, down, not_before)
        self.connections += 1

        async def connect() -> None:
            try:
                await loop.create_connection(lambda: Side(down, up), *self.target)
            except OSError as exc:
                print(f"delay_relay: cannot connect to {self.target}: {exc}", file=sys.stderr)
                if client.transport is not None:
                    client.transport.abort()

        loop.create_task(connect())
        return client


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


async def main_async(args: argparse.Namespace) -> None:
    relay = Relay(_hostport(args.target), args.delay_ms / 1000.0, not args.no_handshake_rtt,
                  args.max_inflight)
    loop = asyncio.get_running_loop()
    host, port = _hostport(args.listen)
    server = await loop.create_server(relay.client_side, host, port, backlog=1024,
                                      reuse_address=True)
    addr = server.sockets[0].getsockname()
    print(f"ready {addr[0]}:{addr[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (port 0: any)")
    p.add_argument("--target", required=True, help="HOST:PORT to relay to")
    p.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay (default 10)")
    p.add_argument("--no-handshake-rtt", action="store_true",
                   help="do not charge a new connection one round trip for the TCP handshake")
    p.add_argument("--max-inflight", type=int, default=4 << 20,
                   help="bytes in flight per direction before reading pauses")
    args = p.parse_args()
    try:
        asyncio.run(main_async(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
