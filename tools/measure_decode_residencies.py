#!/usr/bin/env python3
"""Whole decode steps in float32 and in bfloat16 residency, in one process, interleaved, paired.

    python tools/measure_decode_residencies.py [-m DIR] [--prompt N] [--steps N] [--rounds N] [-t N]
                                               [--variants LIST]

On a machine that other processes share, two residencies timed minutes apart (`bench`, one
`tools/bench_compare.py` engine after another) see different machines. Here one process holds
the checkpoint in both residencies, prefills the same --prompt synthetic tokens into a session
of each, then decodes --steps greedy tokens in each in turn, round after round: each round's
bfloat16 / float32 speed is a ratio of steps taken seconds apart, and the figure is the median over
rounds. Variants of bfloat16 are `form:KiB`: `halves:512` converts decode steps by halves in
blocks of 512 KiB (products.HALVES_BLOCK_BYTES), `rows:4096` whole rows in blocks of 4 MiB, as
before halves (products.CONVERT_BLOCK_BYTES). The time in weight products is reported apart from
the rest of the step (attention, norms, Python). Not a test: its numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from tool_support import run_tool  # first: it makes this checkout's llama3_np importable

import numpy as np

from llama3_np import products
from llama3_np.cli.common import model_dir
from llama3_np.formats.checkpoint import load_checkpoint
from llama3_np.generation import Session
from llama3_np.xcheck.bench import synthetic_prompt


def run(args) -> int:
    products.set_threads(args.threads)
    checkpoints = {dtype: load_checkpoint(model_dir(args.model), dtype=dtype) for dtype in ("float32", "bfloat16")}
    config = checkpoints["float32"].config
    variants = {"float32": None}
    for v in args.variants:
        form, _, kib = v.partition(":")
        variants[f"bfloat16 {v}"] = (form == "halves", int(kib) << 10)
    ctx = args.prompt + args.steps * args.rounds * len(variants) + 1
    sessions, tokens = {}, {}
    for dtype, checkpoint in checkpoints.items():
        sessions[dtype] = Session(checkpoint.weights, config, ctx)
        tokens[dtype] = int(sessions[dtype].feed(synthetic_prompt(args.prompt, config.vocab_size)).argmax())
    in_products = [0.0]
    linear = products.linear

    def timed_linear(x, w):
        t0 = time.perf_counter()
        y = linear(x, w)
        in_products[0] += time.perf_counter() - t0
        return y

    products.linear = timed_linear  # llama3_np.linear calls products.linear by attribute
    step_s = {v: [] for v in variants}
    products_s = {v: [] for v in variants}
    halves_before = products.DECODE_BY_HALVES, products.HALVES_BLOCK_BYTES, products.CONVERT_BLOCK_BYTES
    load_averages = []
    try:
        for _ in range(args.rounds):
            load_averages.append(os.getloadavg()[0])
            for v, knobs in variants.items():
                dtype = "float32" if knobs is None else "bfloat16"
                if knobs is not None:
                    products.DECODE_BY_HALVES = knobs[0]
                    products.HALVES_BLOCK_BYTES = products.CONVERT_BLOCK_BYTES = knobs[1]
                in_products[0] = 0.0
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    tokens[dtype] = int(sessions[dtype].feed([tokens[dtype]]).argmax())
                step_s[v].append((time.perf_counter() - t0) / args.steps)
                products_s[v].append(in_products[0] / args.steps)
    finally:
        products.linear = linear
        products.DECODE_BY_HALVES, products.HALVES_BLOCK_BYTES, products.CONVERT_BLOCK_BYTES = halves_before
    print(f"{args.model or 'default model'}: {args.rounds} rounds of {args.steps} decode steps after a {args.prompt}-token "
          f"prompt, {args.threads} threads; load average {min(load_averages):.1f} to {max(load_averages):.1f}; "
          f"prefills convert by {products.bfloat16_conversion()}")
    print(f"{'variant':22s} {'speed / float32':>15s} {'step ms':>9s} {'products ms':>12s} {'rest ms':>8s}  each round's ratio")
    f32 = step_s["float32"]
    for v in variants:
        ratios = [a / b for a, b in zip(f32, step_s[v])]
        print(f"{v:22s} {statistics.median(ratios):15.3f} {statistics.median(step_s[v]) * 1e3:9.1f} "
              f"{statistics.median(products_s[v]) * 1e3:12.1f} "
              f"{statistics.median(s - p for s, p in zip(step_s[v], products_s[v])) * 1e3:8.1f}  "
              + " ".join(f"{r:.2f}" for r in ratios))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", metavar="DIR", help="Hugging Face checkpoint folder (default: the default model)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens before the decode steps (default 128)")
    p.add_argument("--steps", type=int, default=8, help="decode steps of each variant in each round (default 8)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("-t", "--threads", type=int, default=products.default_threads())
    p.add_argument("--variants", type=lambda s: s.split(","), default=["rows:4096", "halves:512"],
                   help="bfloat16 variants, form:KiB (default rows:4096,halves:512)")
    args = p.parse_args(argv)
    for v in args.variants:
        form, _, kib = v.partition(":")
        if form not in ("rows", "halves") or not kib.isdigit() or int(kib) < 1:
            p.error(f"a variant is rows:KiB or halves:KiB, got {v!r}")
    return run_tool("measure_decode_residencies", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
