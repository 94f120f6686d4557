#!/usr/bin/env python3
"""A TCP relay that adds a fixed one-way delay in each direction: a WAN in a box.

    delay_relay.py --listen 127.0.0.1:0 --target 127.0.0.1:8443 --delay-ms 10

Prints ``ready 127.0.0.1:PORT`` on stdout once it listens, then relays every accepted
connection to ``--target``. Bytes going either way are delivered ``--delay-ms`` after they
reached this host's kernel (order kept, EOF and close delayed too), so a request/response
exchange costs one round trip of 2 × delay.

Timing. A network delays packets without using the host's CPU; this relay is a process on
a loaded 2-core machine. So that its own scheduling does not add to the path, each read
takes the kernel's receive timestamp (SO_TIMESTAMPNS) as the arrival time, and the relay
asks the scheduler for priority when it may (``nice -10``; ignored when not permitted).
What remains is the lateness of the delivery timer, which ``--stats`` reports.

The TCP handshake to the relay itself completes locally and at once, which a real path
would not do: by default the relay therefore also holds a new connection's first
client-to-server bytes until one round trip after the accept (``--no-handshake-rtt`` turns
this off). With it, a fresh TLS 1.3 request costs what it costs on a real 20 ms path:
TCP (1 RTT) + TLS (1 RTT) + request (1 RTT).

Flow control: reading from a side pauses while more than ``--max-inflight`` bytes are in
flight towards the other side or its socket buffer holds more than that.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import selectors
import signal
import socket
import struct
import sys
import time

_EOF = object()    # deliver a half-close (shutdown SHUT_WR)
_CLOSE = object()  # deliver a full close
_READ = 65536
ANC_SIZE = socket.CMSG_SPACE(16)  # recvmsg() room for one struct timespec
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; also its SCM_ type


def timestamp_reads(sock: socket.socket) -> None:
    """Ask the kernel to date what ``sock`` receives (read with ``recvmsg(n, ANC_SIZE)``)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    except OSError:
        pass  # no kernel timestamps: the read time stands in


def kernel_time(anc: list[tuple[int, int, bytes]]) -> float | None:
    """Wall-clock time the kernel received the bytes of one recvmsg(), if it said."""
    for level, kind, value in anc:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(value) >= 16:
            sec, nsec = struct.unpack("qq", value[:16])
            return sec + nsec * 1e-9
    return None


class Stats:
    """Lateness of deliveries (ms past their due time), printed at exit with --stats."""

    def __init__(self) -> None:
        self.late: list[float] = []

    def report(self) -> str:
        if not self.late:
            return "delay_relay: no deliveries"
        v = sorted(self.late)
        return (f"delay_relay: {len(v)} deliveries, late p50 {v[len(v) // 2]:.3f} ms, "
                f"p99 {v[int(len(v) * 0.99)]:.3f} ms, max {v[-1]:.3f} ms")


class Side:
    """One TCP connection of a relayed pair, driven by reader/writer callbacks."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.out: Pipe | None = None    # carries what this side receives
        self.back: Pipe | None = None   # delivers to this side
        self.wbuf = bytearray()
        self.reading = False
        self.writing = False
        self.connected = False
        self.pausers: set[object] = set()
        self.eof_after_write = False
        self.closed = False
        self.read_eof = False
        self.write_eof = False
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        timestamp_reads(sock)

    # -- reading ---------------------------------------------------------------------------
    def start_reading(self) -> None:
        if not self.reading and not self.closed and not self.read_eof and not self.pausers:
            self.reading = True
            self.loop.add_reader(self.fd, self._readable)

    def stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.fd)

    def pause(self, reason: object) -> None:
        self.pausers.add(reason)
        self.stop_reading()

    def resume(self, reason: object) -> None:
        if reason in self.pausers:
            self.pausers.discard(reason)
            self.start_reading()

    def _readable(self) -> None:
        assert self.out is not None
        try:
            data, anc, _flags, _addr = self.sock.recvmsg(_READ, ANC_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.stop_reading()
            self.read_eof = True
            self.out.push(_CLOSE, self.arrival([]))
            return
        arrived = self.arrival(anc)
        if data:
            self.out.push(data, arrived)
        else:
            self.stop_reading()
            self.read_eof = True
            self.out.push(_EOF, arrived)
            if self.write_eof:
                self.close()  # both directions are done

    def arrival(self, anc: list[tuple[int, int, bytes]]) -> float:
        """Loop time at which the bytes reached the kernel."""
        now = self.loop.time()
        received = kernel_time(anc)
        if received is not None:
            age = time.time() - received
            if 0.0 <= age < 1.0:
                return now - age
        return now

    # -- writing ---------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.wbuf:
            try:
                n = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self.close()
                return
            data = data[n:]
        if data:
            self.wbuf += data
            self._want_write()

    def shutdown_write(self) -> None:
        if self.wbuf:
            self.eof_after_write = True
            return
        self.write_eof = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if self.read_eof:
            self.close()

    def _want_write(self) -> None:
        if not self.writing and not self.closed:
            self.writing = True
            self.loop.add_writer(self.fd, self._writable)

    def _writable(self) -> None:
        if self.wbuf:
            try:
                n = self.sock.send(self.wbuf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close()
                return
            del self.wbuf[:n]
        if not self.wbuf:
            self.writing = False
            self.loop.remove_writer(self.fd)
            if self.back is not None:
                self.back.drained()
            if self.eof_after_write:
                self.eof_after_write = False
                self.shutdown_write()

    def close(self) -> None:
        if self.closed:
            return
        self.stop_reading()
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.fd)
        self.closed = True
        self.sock.close()


class Pipe:
    """One direction: what ``src`` receives is delivered to ``dst`` ``delay`` s later."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float, max_inflight: int,
                 src: Side, dst: Side, stats: Stats | None) -> None:
        self.loop = loop
        self.delay = delay
        self.max_inflight = max_inflight
        self.src = src
        self.dst = dst
        self.stats = stats
        self.queue: collections.deque[tuple[float, object]] = collections.deque()
        self.inflight = 0
        self.last_when = 0.0
        self.not_before = 0.0
        self.timer: asyncio.TimerHandle | None = None
        src.out = self
        dst.back = self

    def push(self, item: object, arrived: float) -> None:
        when = max(arrived, self.not_before) + self.delay
        when = max(when, self.last_when)   # never reorder
        self.last_when = when
        self.queue.append((when, item))
        if isinstance(item, bytes):
            self.inflight += len(item)
            if self.inflight > self.max_inflight:
                self.src.pause(self)
        self.schedule()

    def schedule(self) -> None:
        if self.timer is None and self.queue and self.dst.connected:
            self.timer = self.loop.call_at(self.queue[0][0], self._flush)

    def _flush(self) -> None:
        self.timer = None
        # asyncio runs timers up to one clock resolution early; deliver what is due.
        now = self.loop.time()
        dst = self.dst
        while self.queue and self.queue[0][0] <= now + 0.0002:
            when, item = self.queue.popleft()
            if self.stats is not None:
                self.stats.late.append((now - when) * 1000)
            if isinstance(item, bytes):
                self.inflight -= len(item)
                dst.send(item)
            elif item is _EOF:
                dst.shutdown_write()
            else:  # _CLOSE
                dst.close()
                self.src.close()
        if len(dst.wbuf) > self.max_inflight:
            self.src.pause(self)  # the destination does not keep up: resumed by drained()
        else:
            self.drained()
        self.schedule()

    def drained(self) -> None:
        """The destination's socket took what was written to it."""
        if self.inflight <= self.max_inflight // 4:
            self.src.resume(self)


class Relay:
    def __init__(self, loop: asyncio.AbstractEventLoop, listener: socket.socket,
                 target: tuple[str, int], delay: float, handshake_rtt: bool,
                 max_inflight: int, stats: Stats | None) -> None:
        self.loop = loop
        self.listener = listener
        self.target = target
        self.delay = delay
        self.handshake_rtt = handshake_rtt
        self.max_inflight = max_inflight
        self.stats = stats
        listener.setblocking(False)
        loop.add_reader(listener.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            print(f"delay_relay: accept failed: {exc}", file=sys.stderr)
            return
        client = Side(self.loop, sock)
        client.connected = True
        upstream = Side(self.loop, socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        up = Pipe(self.loop, self.delay, self.max_inflight, client, upstream, self.stats)
        Pipe(self.loop, self.delay, self.max_inflight, upstream, client, self.stats)
        if self.handshake_rtt:
            # The client's first bytes could leave only after a SYN/SYN-ACK round trip.
            up.not_before = self.loop.time() + 2 * self.delay
        client.start_reading()
        try:
            upstream.sock.connect(self.target)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            print(f"delay_relay: cannot connect to {self.target}: {exc}", file=sys.stderr)
            client.close()
            upstream.close()
            return
        self.loop.add_writer(upstream.fd, self._connected, upstream, up, client)

    def _connected(self, upstream: Side, up: Pipe, client: Side) -> None:
        self.loop.remove_writer(upstream.fd)
        err = upstream.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            print(f"delay_relay: cannot connect to {self.target}: {os.strerror(err)}",
                  file=sys.stderr)
            client.close()
            upstream.close()
            return
        upstream.connected = True
        upstream.start_reading()
        up.schedule()


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


async def main_async(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    host, port = _hostport(args.listen)
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(1024)
    stats = Stats() if args.stats else None
    Relay(loop, listener, _hostport(args.target), args.delay_ms / 1000.0,
          not args.no_handshake_rtt, args.max_inflight, stats)
    addr = listener.getsockname()
    print(f"ready {addr[0]}:{addr[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    loop.remove_reader(listener.fileno())  # select() fails on a closed descriptor
    listener.close()
    if stats is not None:
        print(stats.report(), file=sys.stderr, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (port 0: any)")
    p.add_argument("--target", required=True, help="HOST:PORT to relay to")
    p.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay (default 10)")
    p.add_argument("--no-handshake-rtt", action="store_true",
                   help="do not charge a new connection one round trip for the TCP handshake")
    p.add_argument("--max-inflight", type=int, default=4 << 20,
                   help="bytes in flight per direction before reading pauses")
    p.add_argument("--stats", action="store_true",
                   help="print how late deliveries were (p50, p99, max) on stderr at exit")
    args = p.parse_args()
    try:
        os.nice(-10)  # a network path does not queue behind the host's other processes
    except OSError:
        pass
    try:
        # select() takes its timeout in microseconds; epoll (asyncio's default) in whole
        # milliseconds, rounded up, which made deliveries 0.3 ms late at p50 and up to 2.5 ms
        # at p99. The relay holds a few hundred descriptors at most (below FD_SETSIZE).
        loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
        try:
            loop.run_until_complete(main_async(args))
        finally:
            loop.close()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
