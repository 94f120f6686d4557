#!/usr/bin/env python3
"""Longer parser fuzzing than the test suite's: seeds from --seed on, until --seconds pass.

    bench/fuzz.py                    # 10 minutes, request and response parsers
    bench/fuzz.py --seconds 60 --seed 1000

Each input (structured mutations of valid messages, and random bytes) is parsed whole, byte
by byte and split at random points; any exception other than ParseError, or a different
accept/reject verdict between the modes, stops the run with the input printed (exit 1).
Differing 4xx statuses between modes are reported as findings.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # proxyd from this checkout
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import test_adversarial as adv  # noqa: E402  (the suite's fuzzer: mutations and oracle)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=100, help="first seed (the suite uses 1 and 2)")
    a = p.parse_args()
    end = time.monotonic() + a.seconds
    seed, totals, findings = a.seed, {"inputs": 0, "accepted": 0, "rejected": 0}, []
    while time.monotonic() < end:
        for kind, seeds in (("req", adv.REQ_SEEDS), ("resp", adv.RESP_SEEDS)):
            try:
                stats = adv._fuzz(kind, seeds, seed, n_mut=1500, n_rand=300)
            except BaseException as exc:  # pytest.fail raises a BaseException subclass
                print(f"[fuzz] FAILED {kind} seed {seed}: {exc}")
                return 1
            totals["inputs"] += stats["accepted"] + stats["rejected"]
            totals["accepted"] += stats["accepted"]
            totals["rejected"] += stats["rejected"]
            findings += [(kind, seed, ex) for ex in stats.get("examples", [])]
        seed += 1
        print(f"[fuzz] seeds {a.seed}..{seed - 1}: {totals}, status differences "
              f"{len(findings)}", flush=True)
    for kind, s, (data, whole, other) in findings[:20]:
        print(f"[fuzz] {kind} seed {s}: whole {whole} vs split {other} on {data!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
