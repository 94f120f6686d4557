#!/usr/bin/env python3
"""Soak proxyd: steady load for a long time, sampling RSS and open fds; fail if they grow.

    bench/soak.py                   # 30 minutes, a sample every 60 s
    bench/soak.py --minutes 5 --interval 20

Each interval runs wrk (1 KiB responses, 32 keep-alive connections through proxyd), plus
churn that exercises other paths: 200 short-lived client connections, 20 requests to a name
that does not resolve, and 20 clients that disconnect mid-response. Then it samples the RSS
and open file descriptors of the master and each worker. The first interval is warm-up; the
trend is judged from the second sample on: RSS may not grow by more than 10 % + 8 MiB and fds
by more than 10 % + 16, and no worker may be replaced. Exit status 1 on growth or failure.
"""

from __future__ import annotations

import argparse
import http.client
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (the bench harness: origin, proxyd start/stop, wrk)


def churn(inst: run.ProxyInst) -> int:
    """Short-lived, failing and aborted clients; returns how many requests failed oddly."""
    odd = 0
    for _ in range(200):
        c = http.client.HTTPConnection("127.0.0.1", inst.port, timeout=10)
        c.request("GET", inst.uri("1k"), headers={"Host": inst.host_header})
        odd += c.getresponse().read() is None
        c.close()
    for _ in range(20):
        c = http.client.HTTPConnection("127.0.0.1", inst.port, timeout=10)
        c.request("GET", "http://nonexistent.invalid/")
        odd += c.getresponse().status != 502
        c.close()
    for _ in range(20):  # read part of a 1 MiB response, then vanish
        s = socket.create_connection(("127.0.0.1", inst.port), timeout=10)
        s.sendall(f"GET {inst.uri('1m')} HTTP/1.1\r\nHost: {inst.host_header}\r\n\r\n".encode())
        s.recv(4096)
        s.close()
    return odd


def sample(inst: run.ProxyInst) -> dict[str, object]:
    pids = [inst.proc.pid] + inst.workers()
    return {"t": time.monotonic(), "pids": inst.workers(),
            "rss_kib": sum(run.rss_kib(p) for p in pids), "fds": sum(run.fd_count(p) for p in pids)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--interval", type=float, default=60.0, help="seconds between samples")
    a = p.parse_args()
    run.check_tools(install=False)
    args = run.parse_args(["--quick"])
    env = run.Env(args)
    try:
        inst = env.start_proxy("proxyd")
        run.check_instance(env, inst)
        samples, odd = [], 0
        end = time.monotonic() + a.minutes * 60
        while time.monotonic() < end:
            res = run.run_wrk(env, inst, "1k", 32, a.interval, "soak")
            odd += churn(inst)
            s = sample(inst)
            s["rps"] = round(res["rps"])
            samples.append(s)
            print(f"[soak] {len(samples):3d}  {s['rps']:>7,} req/s  RSS {s['rss_kib']:>8,} KiB  "
                  f"fds {s['fds']:>5}  workers {s['pids']}", flush=True)
        return judge(samples, odd, env)
    finally:
        env.close()


def judge(samples: list[dict], odd: int, env: run.Env) -> int:
    if len(samples) < 3:
        print("[soak] too few samples to judge a trend (raise --minutes)")
        return 1
    base, last = samples[1], samples[-1]
    rss_ok = last["rss_kib"] <= base["rss_kib"] * 1.10 + 8192
    fds_ok = last["fds"] <= base["fds"] * 1.10 + 16
    same_workers = all(s["pids"] == base["pids"] for s in samples[1:])
    print(f"[soak] RSS {base['rss_kib']:,} -> {last['rss_kib']:,} KiB ({'ok' if rss_ok else 'GREW'}); "
          f"fds {base['fds']} -> {last['fds']} ({'ok' if fds_ok else 'GREW'}); workers "
          f"{'unchanged' if same_workers else 'REPLACED'}; odd churn results {odd}; "
          f"anomalies {len(env.anomalies)}")
    return 0 if rss_ok and fds_ok and same_workers and not odd else 1


if __name__ == "__main__":
    sys.exit(main())
