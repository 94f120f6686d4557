#!/usr/bin/env python3
"""CPU cost of proxyd's own work per request, without sockets, TLS or the event loop.

One ClientConnection and one pooled UpstreamConnection of a real Worker (default config:
access log and metrics on) are fed a keep-alive absolute-form GET and an nginx-like 1 KiB
response, over and over, through fake transports that only collect what is written::

    python3 bench/hotpath_cpu.py              # µs per request (process CPU time)
    python3 bench/hotpath_cpu.py --profile    # plus a cProfile table of the hot path
    python3 bench/hotpath_cpu.py --cold       # caches evicted before every request
    python3 bench/hotpath_cpu.py --cold --no-metrics --no-access-log   # what those cost

This isolates parsing, routing, the pool, header rules, the access log and metrics from
the kernel and OpenSSL. Under wrk the same code costs about twice as much: between two
requests of a worker the clients, the origin and the other worker run on the same cores
and evict its caches. ``--cold`` imitates that by writing a 4 MiB buffer (one byte per
cache line) before each request and times the requests alone (wall clock, median of
five runs): it ranks changes the way the wrk load does where the hot loop does not (work
moved into batches, fewer distinct code paths). Not a benchmark against other proxies:
see bench/run for those.
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


_EVICT = bytearray(4 * 1024 * 1024)
_EVICT_LINES = bytes(len(_EVICT[::64]))


def _evict_caches() -> None:
    _EVICT[::64] = _EVICT_LINES  # one write per 64-byte line


async def run(n: int, profile: bool, cold: bool = False, metrics: bool = True,
              access_log: bool = True) -> float:
    cfg = config.from_mapping({
        "origin": [{"host": "localhost", "port": 9443, "max_requests": 10**9, "lifetime": 1e9}],
        "metrics": metrics, "access_log": access_log,
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
    def one_request(i: int) -> None:
        client.data_received(REQUEST)
        upstream.data_received(RESPONSE)
        if i % 1000 == 0:
            client_transport.out.clear()
            upstream.transport.out.clear()  # type: ignore[union-attr]

    if cold:
        elapsed = 0.0
        clock = time.perf_counter
        for i in range(n):
            _evict_caches()
            started = clock()
            one_request(i)
            elapsed += clock() - started
    else:
        started = time.process_time()
        for i in range(n):
            one_request(i)
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
    ap.add_argument("--cold", action="store_true",
                    help="evict the caches before every request (median of 5 runs of -n/5)")
    ap.add_argument("--no-metrics", action="store_true", help="metrics = false")
    ap.add_argument("--no-access-log", action="store_true", help="access_log = false")
    args = ap.parse_args()
    options = {"metrics": not args.no_metrics, "access_log": not args.no_access_log}
    # The access log is written in 64 KiB batches to stderr, as in a worker: to /dev/null.
    stderr = sys.stderr
    with open(os.devnull, "w") as devnull:
        sys.stderr = devnull
        try:
            if args.cold:
                runs = sorted(asyncio.run(run(max(1, args.n // 5), False, True, **options))
                              for _ in range(5))
                per_request = runs[2]
            else:
                per_request = asyncio.run(run(args.n, args.profile, **options))
        finally:
            sys.stderr = stderr
    what = "with cold caches, median of 5 runs" if args.cold else "CPU"
    print(f"{per_request * 1e6:.1f} µs per request ({what}; proxyd's own work, no I/O)")


if __name__ == "__main__":
    main()
