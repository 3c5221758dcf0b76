#!/usr/bin/env python3
"""Time a batch's decode steps against one sequence's, under each multi-row product kernel, and
where a batched step's time goes (BENCHMARKS.md, "Batches").

    python tools/measure_batch_decode.py [-m DIR] [--dtype float32|bfloat16] [-np 1,8] [--prompt N]
                                         [--new N] [--rounds R] [-t N] [--kernels x·wT,w·xT]

For each N of -np: N distinct synthetic prompts of --prompt tokens, then --new greedy tokens each,
all N in one `model.forward_batch` a step (`generation.generate_batch`, the path of `generate -f
FILE -np N`), in one process that loads the model once. Decode tok/s = N·(new − 1) / decode
seconds, the first token coming from the prefill (llama-batched-bench's figure). Each kernel of
--kernels sets `products.TRANSPOSED_MAX_ROWS` (x·wT: 0, every product of several rows as x · wᵀ;
w·xT: llama3_np's choice, (w · xᵀ)ᵀ up to that many rows); rounds interleave every N and kernel.
Printed: medians over rounds, each N's decode speed over N=1's under the same kernel (the median
of each round's ratio), and the share of a decode step's time spent in the weight products
(`products.linear`), in attention (`model.attention` but its products) and drawing the
tokens (`Session._draw`), the rest being the layers' element-wise stages and Python. Not a test:
its numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict

from tool_support import run_tool  # first: it makes this checkout's llama3_np importable

import numpy as np

from llama3_np import generation, model, products
from llama3_np.cli.common import model_dir
from llama3_np.load import load_model
from llama3_np.xcheck.bench import synthetic_prompt

KERNELS = {"x·wT": 0, "w·xT": products.TRANSPOSED_MAX_ROWS}


class Clock:
    """Seconds spent in some functions, each wrapped where its callers look it up; a function's
    time excludes that of the timed functions it calls (attention's own products count as products)."""

    def __init__(self):
        self.spent = defaultdict(float)
        self.stack: list[str] = []

    def wrap(self, owner, name: str, label: str) -> None:
        real = getattr(owner, name)

        def timed(*args, **kwargs):
            self.stack.append(label)
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - t0
                self.stack.pop()
                self.spent[label] += seconds
                if self.stack:
                    self.spent[self.stack[-1]] -= seconds

        setattr(owner, name, timed)


def run(args) -> int:
    products.set_threads(args.threads)
    loaded = load_model(model_dir(args.model), dtype=args.dtype, need_tokenizer=False)
    config = loaded.config
    clock = Clock()
    clock.wrap(model, "attention", "attention")
    clock.wrap(products, "linear", "products")
    clock.wrap(generation.Session, "_draw", "draw")
    ids = synthetic_prompt(max(args.np) * args.prompt, config.vocab_size)
    ctx = args.prompt + args.new

    def job(n: int):
        prompts = [ids[b * args.prompt:(b + 1) * args.prompt] for b in range(n)]
        first = []

        def on_step(i, step):
            if not first:
                first.append(time.perf_counter())
                clock.spent.clear()
            return False

        gens = (loaded.session(ctx).generate(p, None, np.random.default_rng(0), args.new, stop_ids=()) for p in prompts)
        done = list(generation.generate_batch(gens, n, on_step))
        seconds = time.perf_counter() - first[0]
        shares = {k: v / seconds for k, v in clock.spent.items()}
        return n * (args.new - 1) / seconds, shares, [g.ids for g in done]

    results = defaultdict(list)
    ids_seen = {}
    for r in range(args.rounds):
        for n in args.np:
            kernels = args.kernels if r % 2 == 0 else args.kernels[::-1]
            for k in kernels:
                products.TRANSPOSED_MAX_ROWS = KERNELS[k]
                rate, shares, out = job(n)
                results[n, k].append((rate, shares))
                ids_seen.setdefault(n, out)
                assert out == ids_seen[n], "greedy ids changed with the kernel"
    base = min(args.np)
    print(f"{args.model or 'default model'}, {args.dtype} residency, {args.threads} thread(s), prompt {args.prompt}, "
          f"{args.new} new tokens; medians of {args.rounds} rounds")
    print("| N | kernel | decode tok/s | / N=%d | products | attention | draw | rest |" % base)
    print("|---|---|---|---|---|---|---|---|")
    for n in args.np:
        for k in args.kernels:
            rows = results[n, k]
            rate = statistics.median(x for x, _ in rows)
            over = statistics.median(x / y for (x, _), (y, _) in zip(rows, results[base, k]))
            share = {key: statistics.median(s.get(key, 0.0) for _, s in rows) for key in ("products", "attention", "draw")}
            rest = 1 - sum(share.values())
            print(f"| {n} | {k} | {rate:.2f} | {over:.2f} | {share['products']:.0%} | {share['attention']:.0%} | "
                  f"{share['draw']:.0%} | {rest:.0%} |", flush=True)
    if len(args.kernels) == 2:
        for n in args.np:
            a, b = (results[n, k] for k in args.kernels)
            print(f"N={n}: {args.kernels[1]} / {args.kernels[0]} decode speed "
                  f"{statistics.median(y / x for (x, _), (y, _) in zip(a, b)):.2f}")
    return 0


def main(argv=None) -> int:
    def ints(s):
        return [int(v) for v in s.split(",")]

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", help="model folder or GGUF (default: the default model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("-np", type=ints, default=[1, 8])
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("-t", "--threads", type=int, default=products.default_threads())
    p.add_argument("--kernels", type=lambda s: s.split(","), default=list(KERNELS))
    args = p.parse_args(argv)
    return run_tool("measure_batch_decode", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
