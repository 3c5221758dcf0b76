#!/usr/bin/env python3
"""Decode speed on a busy machine: `llama3-np bench` alone, then beside 1, 2, ... CPU-bound
processes this script starts, as a fraction of the rate alone.

    python tools/bench_busy.py [-m DIR] [--competitors 0,1,2] [-t LIST] [--prompt N] [--new N] [--runs N]

Each competitor is a Python process spinning in a loop (one core's worth of work), started before
the bench and killed after it. Each bench is a process of its own, so the thread settings of one
cannot leak into the next. With -t 2,1 every load is measured at 2 threads and at 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from contextlib import contextmanager

from tool_support import REPO, run_tool  # first: it makes this checkout's llama3_np importable

from llama3_np.cli.common import model_dir
from llama3_np.products import default_threads

SPIN = "while True: pass"


@contextmanager
def competitors(n: int):
    """n CPU-bound processes (one core's worth of work each) while the block runs, killed after it."""
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(n)]
    try:
        yield
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def bench(path, threads: int, args) -> dict:
    cmd = [sys.executable, "-m", "llama3_np", "bench", "-m", str(path), "--prompt", str(args.prompt),
           "--new", str(args.new), "--runs", str(args.runs), "-t", str(threads), "--json"]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO, check=True)
    return json.loads(done.stdout)


def run(args) -> int:
    path = model_dir(args.model)
    print(f"model {path}; prompt {args.prompt}, {args.new} new tokens, median of {args.runs} runs; "
          f"load average {os.getloadavg()[0]:.2f} at the start")
    print(f"{'threads':>7s} {'competitors':>11s} {'prefill tok/s':>14s} {'decode tok/s':>13s} "
          f"{'decode / alone':>15s} {'load at start':>14s}")
    for threads in args.threads:
        alone = None
        for n in args.competitors:
            with competitors(n):
                r = bench(path, threads, args)
            alone = alone or (r["decode_tokens_per_s"] if n == 0 else None)
            ratio = f"{r['decode_tokens_per_s'] / alone:15.2f}" if alone else f"{'':15s}"
            print(f"{threads:7d} {n:11d} {r['prefill_tokens_per_s']:14.1f} {r['decode_tokens_per_s']:13.1f} "
                  f"{ratio} {r['load_average']:14.2f}", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", metavar="DIR", help="checkpoint folder (default: the default model)")
    p.add_argument("--competitors", type=lambda s: [int(n) for n in s.split(",")], default=[0, 1, 2],
                   help="numbers of CPU-bound processes to run beside the bench, 0 first (default 0,1,2)")
    p.add_argument("-t", "--threads", type=lambda s: [int(n) for n in s.split(",")], default=[default_threads()],
                   help="comma-separated thread counts (default: one per core)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    return run_tool("bench_busy", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
