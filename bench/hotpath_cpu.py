#!/usr/bin/env python3
"""CPU cost of proxyd's own work per request, without sockets, TLS or the event loop.

One ClientConnection and one pooled UpstreamConnection of a real Worker (default config:
access log and metrics on) are fed a keep-alive absolute-form GET and an nginx-like 1 KiB
response, over and over, through fake transports that only collect what is written::

    python3 bench/hotpath_cpu.py              # µs per request (process CPU time)
    python3 bench/hotpath_cpu.py --profile    # plus a cProfile table of the hot path

This isolates parsing, routing, the pool, header rules, the access log and metrics from
the kernel and OpenSSL; under wrk the same code costs about 1.4 times as much (caches are
shared with the peers). Not a benchmark against other proxies: see bench/run for those.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxyd import config  # noqa: E402
from proxyd.client import ClientConnection  # noqa: E402
from proxyd.router import OriginKey  # noqa: E402
from proxyd.upstream import UpstreamConnection  # noqa: E402
from proxyd.worker import Worker  # noqa: E402

REQUEST = (b"GET http://localhost:9443/1k HTTP/1.1\r\nHost: localhost:9443\r\n"
           b"User-Agent: wrk\r\nAccept: */*\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 25 Nov 2026 12:00:00 GMT\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 1024\r\n"
            b"Last-Modified: Wed, 25 Nov 2026 11:00:00 GMT\r\nConnection: keep-alive\r\n"
            b"ETag: \"6543-400\"\r\nAccept-Ranges: bytes\r\n\r\n" + b"x" * 1024)


class CollectingTransport:
    """Stands in for SocketTransport: keeps what is written, never blocks."""

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def writelines(self, parts: list[bytes]) -> None:
        self.out.append(b"".join(parts))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        raise AssertionError("the benchmark connection must stay open")

    abort = close

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def run(n: int, profile: bool) -> float:
    cfg = config.from_mapping({
        "origin": [{"host": "localhost", "port": 9443, "max_requests": 10**9, "lifetime": 1e9}],
    }, "hotpath_cpu")
    listener = socket.socket()
    worker = Worker(cfg, listener, None)
    pool = worker._make_pool(OriginKey("localhost", 9443, True), cfg.origin[0], learned=False)
    upstream = UpstreamConnection(pool)
    upstream.connection_made(CollectingTransport())  # type: ignore[arg-type]
    pool.idle.append(upstream)
    client = ClientConnection(worker)
    client_transport = CollectingTransport()
    client.connection_made(client_transport)  # type: ignore[arg-type]
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    started = time.process_time()
    for i in range(n):
        client.data_received(REQUEST)
        upstream.data_received(RESPONSE)
        if i % 1000 == 0:
            client_transport.out.clear()
            upstream.transport.out.clear()  # type: ignore[union-attr]
    elapsed = time.process_time() - started
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(40)
    assert client.exchanges == n and client_transport.out, "requests did not complete"
    listener.close()
    return elapsed / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=30000, help="requests (default 30000)")
    ap.add_argument("--profile", action="store_true", help="print a cProfile table")
    args = ap.parse_args()
    # The access log is written in 64 KiB batches to stderr, as in a worker: to /dev/null.
    stderr = sys.stderr
    with open(os.devnull, "w") as devnull:
        sys.stderr = devnull
        try:
            per_request = asyncio.run(run(args.n, args.profile))
        finally:
            sys.stderr = stderr
    print(f"{per_request * 1e6:.1f} µs of CPU per request (proxyd's own work, no I/O)")


if __name__ == "__main__":
    main()
