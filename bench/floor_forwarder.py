"""The floor: the least a Python worker can do per request on proxyd's path.

Each client connection gets its own TLS connection to the origin, opened when the client
connects, and bytes are piped both ways without any HTTP parsing, routing, logging or
metrics: non-blocking sockets and ``ssl.SSLSocket`` driven by ``loop.add_reader``, like
proxyd's transport. It only works for clients that send one request at a time and whose
origin accepts absolute-form targets (nginx does), which is what ``bench/run`` does, so::

    bench/run --scenario rps-1k --proxyd-cmd "python3 bench/floor_forwarder.py"

measures how close to nginx a Python forwarder can get on this machine at all. It takes the
arguments ``bench/run`` gives proxyd (``--listen``, ``--origin``, ``--ca-file``,
``--workers``; the others are ignored) and prints ``msg=ready`` on stderr. Not a proxy:
no limits, no timeouts, no error handling beyond closing both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import ssl
import sys


class Pipe:
    """One client connection and its own upstream TLS connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop, client: socket.socket,
                 origin: tuple[str, int], ctx: ssl.SSLContext) -> None:
        self.loop = loop
        self.client = client
        client.setblocking(False)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw = socket.socket()
        raw.setblocking(False)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            raw.connect(origin)
        except BlockingIOError:
            pass
        self.up = ctx.wrap_socket(raw, server_hostname="localhost",
                                  do_handshake_on_connect=False, suppress_ragged_eofs=False)
        loop.add_writer(self.up.fileno(), self.handshake)

    def handshake(self) -> None:
        fd = self.up.fileno()
        try:
            self.up.do_handshake()
        except ssl.SSLWantReadError:
            self.loop.remove_writer(fd)
            self.loop.add_reader(fd, self.handshake)
            return
        except ssl.SSLWantWriteError:
            self.loop.remove_reader(fd)
            self.loop.add_writer(fd, self.handshake)
            return
        except OSError:
            self.close()
            return
        self.loop.remove_writer(fd)
        self.loop.remove_reader(fd)
        self.loop.add_reader(fd, self.from_origin)
        self.loop.add_reader(self.client.fileno(), self.from_client)

    def from_client(self) -> None:
        try:
            data = self.client.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        try:
            self.up.sendall(data)  # small requests: one record, the socket buffer takes it
        except OSError:
            self.close()

    def from_origin(self) -> None:
        while True:
            try:
                data = self.up.recv(65536)
            except ssl.SSLWantReadError:
                return
            except OSError:
                data = b""
            if not data:
                self.close()
                return
            try:
                self.client.sendall(data)
            except OSError:
                self.close()
                return
            if len(data) < 16384 and not self.up.pending():
                return

    def close(self) -> None:
        for sock in (self.client, self.up):
            try:
                self.loop.remove_reader(sock.fileno())
                self.loop.remove_writer(sock.fileno())
            except (ValueError, OSError):
                pass
            sock.close()


def serve(listener: socket.socket, origin: tuple[str, int], ca_file: str | None) -> None:
    ctx = ssl.create_default_context(cafile=ca_file)

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def accept() -> None:
            try:
                client, _ = listener.accept()
            except BlockingIOError:
                return
            Pipe(loop, client, origin, ctx)

        loop.add_reader(listener.fileno(), accept)
        await asyncio.Event().wait()

    asyncio.run(main())


def host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True)
    p.add_argument("--origin", required=True)
    p.add_argument("--ca-file")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args, _ = p.parse_known_args()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(host_port(args.listen))
    listener.listen(1024)
    listener.setblocking(False)
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            serve(listener, host_port(args.origin), args.ca_file)
            os._exit(0)
        children.append(pid)
    print("msg=ready", file=sys.stderr, flush=True)

    def stop(*_: object) -> None:
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        for pid in children:
            os.waitpid(pid, 0)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
