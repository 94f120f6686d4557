"""CPU per request when every request comes on a new client connection.

That is what ``requests.get`` with ``HTTP_PROXY`` does: connect, one request with
``Connection: close``, read to EOF, close. The bench's nginx origin and one proxyd worker are
started as ``bench/run`` does; the script prints the workers' CPU time (user + system, from
/proc, summed over the workers) per request and the client-observed latency::

    python3 bench/fresh_conn_cpu.py                 # 3 rounds of 2,000 requests, 1 worker
    python3 bench/fresh_conn_cpu.py --workers 2     # every worker that may wake counts
    python3 bench/fresh_conn_cpu.py --requests 500 --proxyd-cmd "python3 -m proxyd"
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: the harness's processes and helpers)


def one_request(port: int, request: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        received = 0
        while chunk := s.recv(65536):
            received += len(chunk)
    return received


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000, help="requests per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=1, help="proxyd workers (default 1)")
    p.add_argument("--proxyd-cmd", default="", help="command to run instead of python3 -m proxyd")
    a = p.parse_args()
    args = bench.parse_args([])
    args.proxyd_cmd = a.proxyd_cmd
    env = bench.Env(args)
    try:
        inst = env.start_proxy("proxyd", workers=a.workers)
        bench.check_instance(env, inst)
        request = (f"GET {inst.uri('1k')} HTTP/1.1\r\nHost: {inst.host_header}\r\n"
                   "Connection: close\r\n\r\n").encode()
        for _ in range(200):  # warm-up: caches, the pool
            one_request(inst.port, request)
        for r in range(a.rounds):
            workers = inst.workers()
            cpu0 = bench.cpu_seconds(workers)
            latencies = []
            for _ in range(a.requests):
                t = time.perf_counter()
                one_request(inst.port, request)
                latencies.append(time.perf_counter() - t)
            cpu = bench.cpu_seconds(workers) - cpu0
            latencies.sort()
            print(f"round {r + 1}: {len(workers)} worker(s) CPU "
                  f"{cpu / a.requests * 1e6:6.1f} µs/request, latency p50 {latencies[len(latencies) // 2] * 1e6:6.0f} µs, "
                  f"p99 {latencies[int(len(latencies) * 0.99)] * 1e6:6.0f} µs", flush=True)
    finally:
        env.close()


if __name__ == "__main__":
    main()
