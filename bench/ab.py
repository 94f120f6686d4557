#!/usr/bin/env python3
"""A/B of proxyd versions or settings under the rps-1k load, in one run, rounds alternating.

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
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variant", nargs="+", type=parse_variant, help="LABEL=CHECKOUT[:TOML]")
    ap.add_argument("--rounds", type=int, default=6, help="rounds (default 6)")
    ap.add_argument("--duration", type=float, default=6.0, help="seconds per round (default 6)")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
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
            run.run_wrk(env, insts[label], "1k", a.connections, args.warmup, "warm-up",
                        record=False)
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
