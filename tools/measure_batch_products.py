#!/usr/bin/env python3
"""Time a weight product of several rows, x · wᵀ for x [T, n_in], by the two ways OpenBLAS can
compute it (`products.TRANSPOSED_MAX_ROWS`; BENCHMARKS.md, "Batches").

    python tools/measure_batch_products.py [--shape default|llama3.2-1b] [--rows 1,2,4,...]
                                           [--threads 1,2] [--dtypes float32,bfloat16] [--rounds N]

`x·wT` is `np.matmul(x, w.T)` on each block of rows of w, `w·xT` is `np.matmul(w, x.T)` into a
[n_out, T] buffer, then transposed into the [T, n_out] result: the same sums, another sgemm path
of OpenBLAS. Both run through `products.linear` itself (its blocks, threads and bfloat16
conversion), for every matrix shape of the model (q, k/v, o, gate/up, down and the output
matrix), each row count T of --rows (a batch's decode step has one row per sequence; a prefill
hundreds), float32 and bfloat16 weights, on 1 and 2 threads. Each shape's weights are distinct
copies of at least RING_BYTES in all, more than the last-level cache, used in turn so that every
product reads its weight from memory, as in a model. Rounds interleave the two ways, cell by cell;
the figures are medians over rounds of the time per product, the ratio x·wT / w·xT is the median
of each round's ratio, and "/ T=1" is w·xT's time over the one-row product's (the decode step of
a single sequence, a matrix-vector product either way). Not a test: its numbers depend on the
machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

from tool_support import run_tool  # first: it makes this checkout's llama3_np importable

import ml_dtypes
import numpy as np
from measure_products import SHAPES

from llama3_np import products

# Distinct weight bytes per shape and dtype: above this machine's 300 MiB last-level cache.
RING_BYTES = 384 << 20
# Weight bytes a cell's timing reads in one round (at least one product): long enough for a timer.
PASS_BYTES = 48 << 20
KERNELS = {"x·wT": 0, "w·xT": 1 << 30}  # products.TRANSPOSED_MAX_ROWS


def shapes(name: str) -> list[tuple[int, int]]:
    """[n_out, n_in] of each distinct matrix shape of a model: q (and o's input), k/v, o, gate/up,
    down, output."""
    c = SHAPES[name]
    found = [(c.n_heads * c.head_dim, c.dim), (c.n_kv_heads * c.head_dim, c.dim), (c.dim, c.n_heads * c.head_dim),
             (c.ffn_dim, c.dim), (c.dim, c.ffn_dim), (c.vocab_size, c.dim)]
    return list(dict.fromkeys(found))


def ring(shape, dtype, value=0.01) -> list[np.ndarray]:
    n_bytes = shape[0] * shape[1] * np.dtype(dtype).itemsize
    return [np.full(shape, value, dtype=dtype) for _ in range(max(1, -(-RING_BYTES // n_bytes)))]


def run(args) -> int:
    dtypes = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
    rows = sorted(set(args.rows) | {1})
    print(f"{args.shape}: medians of {args.rounds} rounds, ms per product; bfloat16 conversion "
          f"{products.bfloat16_conversion()}; products.SPLIT_MIN_MACS {products.SPLIT_MIN_MACS}")
    print("| n_out x n_in | weights | threads | T | x·wT ms | w·xT ms | x·wT / w·xT | w·xT / T=1 |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in shapes(args.shape):
        rings = {d: ring(shape, dtypes[d]) for d in args.dtypes}
        per_pass = max(1, PASS_BYTES // rings[args.dtypes[0]][0].nbytes)
        inputs = {T: np.full((T, shape[1]), 0.5, dtype=np.float32) for T in rows}
        cells = list(itertools.product(args.dtypes, args.threads, rows))
        times = {(d, t, T, k): [] for d, t, T in cells for k in KERNELS}
        turn = itertools.count()
        for r in range(args.rounds):
            for d, threads, T in cells:
                products.set_threads(threads)
                kernels = list(KERNELS) if r % 2 == 0 else list(reversed(KERNELS))
                for k in kernels if T > 1 else ["x·wT"]:  # one row: a matrix-vector product either way
                    products.TRANSPOSED_MAX_ROWS = KERNELS[k]
                    ws = rings[d]
                    t0 = time.perf_counter()
                    for _ in range(per_pass):
                        products.linear(inputs[T], ws[next(turn) % len(ws)])
                    times[d, threads, T, k].append((time.perf_counter() - t0) / per_pass)
        for d, threads, T in cells:
            a, b = times[d, threads, T, "x·wT"], times[d, threads, T, "w·xT"] or times[d, threads, T, "x·wT"]
            one = statistics.median(times[d, threads, 1, "x·wT"])
            ratio = statistics.median(x / y for x, y in zip(a, b))
            print(f"| {shape[0]}x{shape[1]} | {d} | {threads} | {T} | {statistics.median(a) * 1e3:.3f} | "
                  f"{statistics.median(b) * 1e3:.3f} | {ratio:.2f} | {statistics.median(b) / one:.2f} |", flush=True)
        del rings
    return 0


def main(argv=None) -> int:
    def ints(s):
        return [int(v) for v in s.split(",")]

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="default")
    p.add_argument("--rows", type=ints, default=[2, 4, 8, 16, 32, 64, 128, 256, 512],
                   help="row counts T (default 2,...,512; T=1 is always timed)")
    p.add_argument("--threads", type=ints, default=[1, 2])
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    return run_tool("measure_batch_products", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
