#!/usr/bin/env python3
"""Where a sequential request's time goes: client, proxy and origin on one syscall timeline.

``bench/run --scenario latency-seq`` says how much latency a proxy adds; this says where it
is spent. It starts the origin and each proxy as ``bench/run`` does, sends sequential 1 KiB
requests from one raw keep-alive socket in this process, and records the system calls of
this process, the proxy's serving worker and the origin's worker with ``perf record``
(tracepoints ``raw_syscalls:sys_enter/sys_exit``, one clock for all three). Each request is
then cut into segments, printed as medians (µs)::

    python3 bench/latency_timeline.py                       # proxyd, nginx, haproxy
    python3 bench/latency_timeline.py --kind proxyd --kind nginx --seconds 3

Segments, in order: the client's send syscall; client -> proxy wake-up (from the client's
send to the proxy's epoll returning); the proxy's request work (from there to its upstream
write, its recv included); the upstream write syscall; proxy -> origin wake-up; the origin's
work; its write; origin -> proxy wake-up; the proxy's response work (its TLS reads included);
the proxy's send to the client; proxy -> client wake-up (to the client's recv returning).
A wake-up is the kernel's delivery and the scheduler's: on a VM where a cross-CPU wake-up
is an IPI it costs several times a same-CPU one, and which of the two a request gets
depends on where the scheduler put the three processes.

Needs perf (Debian's linux-perf) and root (tracepoints), x86_64 or aarch64, and what
``bench/run`` needs. perf adds a few µs to every system call: compare segments between
proxies measured here, not with ``bench/run``'s figures.
"""

from __future__ import annotations

import argparse
import bisect
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ab  # noqa: E402  (bench/ab.py: sequential_client, schedstat_ns)
import run  # noqa: E402  (bench/run.py: Env)

# System call numbers (perf prints numbers): the ones the timeline is cut at.
_SYSCALLS = {
    "x86_64": {"recv": {45, 0, 47}, "send": {44, 1, 20, 46}, "poll": {232, 281}},
    "aarch64": {"recv": {207, 63, 212}, "send": {206, 64, 66, 211}, "poll": {22}},
}
SEGMENTS = ("client send", "client->proxy wake", "proxy request work", "upstream write",
            "proxy->origin wake", "origin work", "origin write", "origin->proxy wake",
            "proxy response work", "proxy send", "proxy->client wake", "total")
_LINE = re.compile(r"\s*(\d+)\s+([\d.]+):\s+raw_syscalls:sys_(enter|exit):\s+NR (\d+)")

Event = tuple[float, bool, int]  # (µs, is_exit, syscall number)


class Track:
    """The system calls of one process, searchable by time."""

    def __init__(self, events: list[Event]) -> None:
        self.events = events
        self.times = [e[0] for e in events]

    def next(self, after: float, exit_: bool, numbers: set[int]) -> float:
        """Time of the first enter (or exit) of one of ``numbers`` at or after ``after``."""
        events = self.events
        for i in range(bisect.bisect_left(self.times, after), len(events)):
            t, is_exit, nr = events[i]
            if is_exit is exit_ and nr in numbers:
                return t
        raise LookupError("the trace ends first")


def read_tracks(script_output: str, pids: list[int]) -> dict[int, Track]:
    events: dict[int, list[Event]] = {pid: [] for pid in pids}
    for line in script_output.splitlines():
        m = _LINE.match(line)
        if m and int(m.group(1)) in events:
            events[int(m.group(1))].append(
                (float(m.group(2)) * 1e6, m.group(3) == "exit", int(m.group(4))))
    return {pid: Track(ev) for pid, ev in events.items()}


def segments(client: Track, proxy: Track, origin: Track,
             nr: dict[str, set[int]]) -> dict[str, list[float]]:
    """Cut the trace into requests, each anchored at a send of the client."""
    out: dict[str, list[float]] = {name: [] for name in SEGMENTS}
    send, recv, poll = nr["send"], nr["recv"], nr["poll"]
    for t0, is_exit, number in client.events:
        if is_exit or number not in send:
            continue
        try:
            marks = [t0, client.next(t0, True, send)]
            woke = proxy.next(t0, True, poll)
            up = proxy.next(woke, False, send)
            marks += [woke, up, proxy.next(up, True, send)]
            o_woke = origin.next(up, True, poll)
            o_send = origin.next(o_woke, False, send)
            marks += [o_woke, o_send, origin.next(o_send, True, send)]
            p_woke = proxy.next(o_send, True, poll)
            p_send = proxy.next(p_woke, False, send)
            marks += [p_woke, p_send, proxy.next(p_send, True, send),
                      client.next(p_send, True, recv)]
        except LookupError:
            break
        c_send, c_sent, woke, up, up_done, o_woke, o_send, o_done, p_woke, p_send, p_done, \
            got = marks
        if got - c_send > 5000:
            continue  # a stall (perf's own buffer flush, a page fault storm): not a request
        values = (c_sent - c_send, woke - c_send, up - woke, up_done - up, o_woke - up,
                  o_send - o_woke, o_done - o_send, p_woke - o_send, p_send - p_woke,
                  p_done - p_send, got - p_send, got - c_send)
        for name, value in zip(SEGMENTS, values):
            out[name].append(value)
    return out


def busiest(pids: list[int], one: Callable[[], int]) -> int:
    """Of ``pids``, the process that runs most while requests are sent: the worker that
    serves this client's connection."""
    before = {pid: ab.schedstat_ns([pid]) for pid in pids}
    for _ in range(300):
        one()
    return max(pids, key=lambda pid: ab.schedstat_ns([pid]) - before[pid])


def trace_one(env: run.Env, kind: str, seconds: float,
              nr: dict[str, set[int]]) -> dict[str, list[float]]:
    origin = env.start_origin()
    inst = env.start_proxy(kind)
    run.check_instance(env, inst)
    sock = socket.create_connection(("127.0.0.1", inst.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = f"GET {inst.uri('1k')} HTTP/1.1\r\nHost: {inst.host_header}\r\n\r\n".encode()
    one = ab.sequential_client(sock, request, run.KIB)
    for _ in range(300):  # warm-up: pools, caches
        one()
    worker = busiest(inst.workers() or [inst.proc.pid], one)
    origin_worker = busiest(origin.workers() or [origin.proc.pid], one)
    pids = [os.getpid(), worker, origin_worker]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "perf.data"
        perf = subprocess.Popen(
            ["perf", "record", "-q", "-e", "raw_syscalls:sys_enter,raw_syscalls:sys_exit",
             "-p", ",".join(map(str, pids)), "-o", str(data), "--", "sleep", str(seconds)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.3)  # perf attaches before the measured requests
        while perf.poll() is None:
            one()
        if perf.returncode != 0:
            raise SystemExit(f"perf record failed: {perf.stderr.read().decode()[-500:]}")
        script = subprocess.run(["perf", "script", "-i", str(data), "-F", "pid,time,event,trace"],
                                capture_output=True, text=True, check=True).stdout
    sock.close()
    env.stop(inst)
    tracks = read_tracks(script, pids)
    return segments(tracks[pids[0]], tracks[worker], tracks[origin_worker], nr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", action="append", choices=("proxyd", "nginx", "haproxy"),
                    help="proxy to trace (repeatable; default: all three)")
    ap.add_argument("--seconds", type=float, default=2.0, help="traced seconds per proxy")
    ap.add_argument("--proxyd-cmd", help="command that runs proxyd (as in bench/run)")
    a = ap.parse_args()
    nr = _SYSCALLS.get(platform.machine())
    if nr is None:
        raise SystemExit(f"system call numbers unknown for {platform.machine()}")
    if shutil.which("perf") is None:
        raise SystemExit("needs perf: apt-get install linux-perf")
    run.check_tools(install=False)
    args = run.parse_args(["--proxyd-cmd", a.proxyd_cmd] if a.proxyd_cmd else [])
    env = run.Env(args)
    results: dict[str, dict[str, list[float]]] = {}
    try:
        for kind in a.kind or ["proxyd", "nginx", "haproxy"]:
            results[kind] = trace_one(env, kind, a.seconds, nr)
    finally:
        env.close()
    kinds = list(results)
    counts = ", ".join(f"{k}: {len(results[k]['total'])} requests" for k in kinds)
    print(f"\nmedian µs per segment ({counts})")
    print(f"  {'segment':22s}" + "".join(f"{k:>10s}" for k in kinds))
    for name in SEGMENTS:
        print(f"  {name:22s}" + "".join(
            f"{statistics.median(results[k][name]):10.1f}" if results[k][name] else f"{'-':>10s}"
            for k in kinds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
