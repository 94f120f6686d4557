#!/usr/bin/env python3
"""A/B of proxyd versions or settings, rps-1k load or sequential latency, rounds alternating.

On a shared 2-core machine a round's req/s moves by ±10 % or more from one minute to the
next, so two versions measured in separate `bench/run` invocations cannot be compared.
Here every variant runs side by side against one nginx origin, the order rotating each
round, and nginx as a forward proxy can be added as the yardstick::

    python3 bench/ab.py old=/path/to/old/checkout new=. nginx=nginx
    python3 bench/ab.py on=. "off=.:metrics = false" --rounds 8

A variant is ``LABEL=CHECKOUT[:TOML]``: proxyd run as ``python3 -P -m proxyd`` with
``PYTHONPATH=CHECKOUT`` and the TOML lines (``\\n`` for a new line) as its config file;
``LABEL=nginx`` is nginx configured as in ``bench/run``. Prints each round and the medians
of req/s and of CPU per request (all processes of each proxy, from /proc: the steadier of
the two). Needs what ``bench/run`` needs.

``--latency`` measures the latency-seq path instead: one keep-alive client per variant (a
raw socket, so that the client's own parsing adds little), sequential 1 KiB requests in
blocks, the variants and a direct pooled TLS client alternating; it prints each variant's
added p50 over the direct client and the CPU per request of its workers and of the origin
(``/proc/PID/schedstat``, nanoseconds: a request costs well under one clock tick)::

    python3 bench/ab.py --latency old=/path/to/old/checkout new=. nginx=nginx --rounds 8
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (bench/run.py: Env, run_wrk, rotate)


def parse_variant(text: str) -> tuple[str, str, str]:
    """``LABEL=CHECKOUT[:TOML]`` -> (label, checkout or "nginx", toml)."""
    label, sep, rest = text.partition("=")
    if not sep or not label or not rest:
        raise argparse.ArgumentTypeError(f"expected LABEL=CHECKOUT[:TOML], got {text!r}")
    checkout, _, toml = rest.partition(":")
    if checkout != "nginx":
        checkout = str(Path(checkout).resolve())
        if not (Path(checkout) / "proxyd" / "__main__.py").is_file():
            raise argparse.ArgumentTypeError(f"{checkout}: no proxyd/__main__.py there")
    return label, checkout, toml.replace("\\n", "\n")


def schedstat_ns(pids: list[int]) -> int:
    """CPU time run so far by ``pids``, in ns (``/proc/PID/schedstat``; gone pids count 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except (OSError, IndexError, ValueError):
            pass
    return total


def sequential_client(sock: socket.socket, request: bytes,
                      size: int) -> Callable[[], int]:
    """A function that sends ``request`` and returns the ns until its response (a head
    and ``size`` body bytes) has arrived whole."""
    def one() -> int:
        started = time.perf_counter_ns()
        sock.sendall(request)
        buf = b""
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the connection closed before a whole response")
            buf += data
            end = buf.find(b"\r\n\r\n")
            if end >= 0 and len(buf) >= end + 4 + size:
                return time.perf_counter_ns() - started
    return one


def latency_ab(env: run.Env, insts: dict[str, run.ProxyInst], rounds: int, n: int) -> None:
    """Sequential-latency A/B: added p50 over a direct pooled TLS client and CPU per request
    of each variant's workers and of the origin, in blocks of ``n`` requests per round."""
    origin = env.start_origin()
    clients: dict[str, Callable[[], int]] = {}
    workers: dict[str, list[int]] = {"direct": []}
    for label, inst in insts.items():
        sock = socket.create_connection(("127.0.0.1", inst.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request = f"GET {inst.uri('1k')} HTTP/1.1\r\nHost: {inst.host_header}\r\n\r\n"
        clients[label] = sequential_client(sock, request.encode(), run.KIB)
        workers[label] = inst.workers()
    raw = socket.create_connection(("127.0.0.1", origin.port), timeout=10)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    direct = env.client_ctx.wrap_socket(raw, server_hostname="localhost")
    clients["direct"] = sequential_client(
        direct, b"GET /1k HTTP/1.1\r\nHost: localhost\r\n\r\n", run.KIB)
    labels = list(clients)
    for label in labels:  # warm-up: pools, caches, the interpreter's specialisation
        for _ in range(200):
            clients[label]()
    origin_pids = [origin.proc.pid, *origin.workers()]
    rows: dict[str, list[tuple[float, float, float]]] = {label: [] for label in labels}
    for r in range(rounds):
        for label in run.rotate(labels, r):
            cpu0, ocpu0 = schedstat_ns(workers[label]), schedstat_ns(origin_pids)
            p50 = statistics.median(clients[label]() for _ in range(n)) / 1000
            cpu = (schedstat_ns(workers[label]) - cpu0) / n / 1000
            rows[label].append((p50, cpu, (schedstat_ns(origin_pids) - ocpu0) / n / 1000))
        direct_p50 = rows["direct"][-1][0]
        print(f"round {r + 1}/{rounds}: direct p50 {direct_p50:.0f} µs; added " + ", ".join(
            f"{label} {rows[label][-1][0] - direct_p50:+.0f} (cpu {rows[label][-1][1]:.0f})"
            for label in labels if label != "direct"), flush=True)
    base = statistics.median(x[0] for x in rows["direct"])
    print(f"\nmedians of {rounds} rounds x {n} sequential requests, load average "
          f"{os.getloadavg()[0]:.2f} now:")
    for label in labels:
        p50 = statistics.median(x[0] for x in rows[label])
        cpu = statistics.median(x[1] for x in rows[label])
        ocpu = statistics.median(x[2] for x in rows[label])
        print(f"  {label:12s} p50 {p50:6.1f} µs  added {p50 - base:+6.1f} µs  "
              f"cpu {cpu:5.1f} µs/req  origin cpu {ocpu:5.1f} µs/req")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variant", nargs="+", type=parse_variant, help="LABEL=CHECKOUT[:TOML]")
    ap.add_argument("--rounds", type=int, default=6, help="rounds (default 6)")
    ap.add_argument("--duration", type=float, default=6.0, help="seconds per round (default 6)")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    ap.add_argument("--latency", action="store_true",
                    help="sequential latency instead of the rps-1k load")
    ap.add_argument("--requests", type=int, default=2000,
                    help="--latency: requests per variant per round (default 2000)")
    a = ap.parse_args()
    labels = [v[0] for v in a.variant]
    if len(set(labels)) != len(labels):
        ap.error("labels must differ")
    run.check_tools(install=False)  # stops with the apt-get command if a tool is missing
    args = run.parse_args(["--duration", str(a.duration)])
    env = run.Env(args)
    insts: dict[str, run.ProxyInst] = {}
    try:
        for label, checkout, toml in a.variant:
            if checkout == "nginx":
                insts[label] = env.start_proxy("nginx", label=label)
            else:
                args.proxyd_cmd = f"env PYTHONPATH={checkout} {sys.executable} -P -m proxyd"
                insts[label] = env.start_proxy("proxyd", label=label, extra_toml=toml)
            run.check_instance(env, insts[label])
            if not a.latency:
                run.run_wrk(env, insts[label], "1k", a.connections, args.warmup, "warm-up",
                            record=False)
        if a.latency:
            latency_ab(env, insts, a.rounds, a.requests)
            return 0
        results: dict[str, list[tuple[float, float]]] = {label: [] for label in labels}
        for r in range(a.rounds):
            for label in run.rotate(labels, r):
                w = run.run_wrk(env, insts[label], "1k", a.connections, a.duration, "ab")
                results[label].append((w["rps"], w["cpu_us_per_req"]))
                print(f"round {r + 1}/{a.rounds} {label:12s} {w['rps']:>9,.0f} req/s  "
                      f"cpu {w['cpu_us_per_req']:6.1f} µs/req", flush=True)
        print(f"\nmedians of {a.rounds} rounds x {a.duration:g} s, {a.connections} connections, "
              f"load average {os.getloadavg()[0]:.2f} now:")
        first = labels[0]
        base_rps = statistics.median(x[0] for x in results[first])
        for label in labels:
            rps = statistics.median(x[0] for x in results[label])
            cpu = statistics.median(x[1] for x in results[label])
            print(f"  {label:12s} {rps:>9,.0f} req/s ({rps / base_rps:.2f}x {first})  "
                  f"cpu {cpu:6.1f} µs/req")
        for note in env.anomalies:
            print(f"  NOTE {note}")
        return 0
    finally:
        env.close()


if __name__ == "__main__":
    sys.exit(main())
