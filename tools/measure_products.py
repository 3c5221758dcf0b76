#!/usr/bin/env python3
"""Time the weight products of a model's decode step and prefill chunk under variants of
`llama3_np/products.py`'s block sizes, split threshold and thread count (BENCHMARKS.md, "Threads
and blocks").

    python tools/measure_products.py [--shape default|llama3.2-1b] [--rounds N] [--variants LIST]

The weights are every matrix of every layer and the output projection of the shape, float32 and
bfloat16, distinct arrays (so each product reads its weight from memory, as in a real model), with
constant values (timing does not depend on them). A decode step is one product of a [1, n_in]
vector with each matrix, in model order; a prefill chunk the same with [T, n_in]. Variants run
interleaved, round after round, in one process; the figures are medians over rounds. Not a test:
its numbers depend on the machine and on what else runs on it. `chosen-shift` and `chosen-cast` are
llama3_np's constants with the bfloat16 conversion named (bit shift, ml_dtypes' cast) rather than
timed at the first product; the process's choice is printed. `chosen-rows` converts decode steps'
bfloat16 blocks as prefills do, whole rows, instead of by halves; `halves-128K` ... `halves-4M` by
halves in blocks of that size. The last column is bfloat16's decode speed over float32's, the
median of each round's ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from tool_support import REPO, run_tool  # first: it makes this checkout's llama3_np importable

import ml_dtypes
import numpy as np

from llama3_np import products
from llama3_np.config import ModelConfig

SHAPES = {
    "default": ModelConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536,
                           vocab_size=49152, norm_eps=1e-5, rope_theta=100000.0, rope_scaling=None,
                           max_seq_len=8192, tie_embeddings=True),
    "llama3.2-1b": ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, ffn_dim=8192,
                               vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, rope_scaling=None,
                               max_seq_len=8192, tie_embeddings=True),
}
MiB = 1 << 20
# name: (threads, CONVERT_BLOCK_BYTES, FLOAT32_BLOCK_BYTES, SPLIT_MIN_MACS); each a change from t2
VARIANTS = {
    "t1": (1, MiB, MiB, 1 << 18),
    "t2": (2, MiB, MiB, 1 << 18),
    "t2-cb256K": (2, MiB // 4, MiB, 1 << 18),
    "t2-cb512K": (2, MiB // 2, MiB, 1 << 18),
    "t2-cb2M": (2, 2 * MiB, MiB, 1 << 18),
    "t2-cb4M": (2, 4 * MiB, MiB, 1 << 18),
    "t2-cb8M": (2, 8 * MiB, MiB, 1 << 18),
    "t2-fb256K": (2, MiB, MiB // 4, 1 << 18),
    "t2-fb4M": (2, MiB, 4 * MiB, 1 << 18),
    "t2-fbhalf": (2, MiB, 1 << 40, 1 << 18),  # float32: one block per thread
    "t2-split64K": (2, MiB, MiB, 1 << 16),
    "t2-split1M": (2, MiB, MiB, 1 << 20),
    "t2-split4M": (2, MiB, MiB, 1 << 22),
    "chosen": (2, 4 * MiB, 4 * MiB, 1 << 22),  # llama3_np's constants
}
# The chosen constants with each bfloat16 conversion named instead of timed at first use.
CONVERSION_VARIANTS = {"shift": "bit shift", "cast": "ml_dtypes cast"}
VARIANTS.update({f"chosen-{short}": VARIANTS["chosen"] for short in CONVERSION_VARIANTS})
VARIANTS["chosen-rows"] = VARIANTS["chosen"]
# Decode steps' bfloat16 blocks converted by halves in blocks of this many bytes (products.HALVES_BLOCK_BYTES).
HALVES_SIZES = {f"halves-{label}": size for label, size in
                (("128K", MiB // 8), ("256K", MiB // 4), ("512K", MiB // 2), ("1M", MiB), ("4M", 4 * MiB))}
VARIANTS.update({name: VARIANTS["chosen"] for name in HALVES_SIZES})


def matrices(config: ModelConfig) -> list[tuple[int, int]]:
    """[n_out, n_in] of every product of one token, in model order."""
    D, F, H, KV, Dh = config.dim, config.ffn_dim, config.n_heads, config.n_kv_heads, config.head_dim
    layer = [(H * Dh, D), (KV * Dh, D), (KV * Dh, D), (D, H * Dh), (F, D), (F, D), (D, F)]
    return layer * config.n_layers + [(config.vocab_size, D)]


def run(args) -> int:
    config = SHAPES[args.shape]
    shapes = matrices(config)
    weights = {"float32": [np.full(s, 0.01, dtype=np.float32) for s in shapes]}
    weights["bfloat16"] = [w.astype(ml_dtypes.bfloat16) for w in weights["float32"]]
    P = args.prefill_tokens
    token_counts = (1, P) if P else (1,)
    inputs = {T: {n_in: np.full((T, n_in), 0.5, dtype=np.float32) for _, n_in in shapes} for T in token_counts}
    names = args.variants or list(VARIANTS)
    halves_block = products.HALVES_BLOCK_BYTES
    times = {(v, dtype, T): [] for v in names for dtype in weights for T in token_counts}
    for r in range(args.rounds):
        for v in names:
            threads, cb, fb, split = VARIANTS[v]
            products.CONVERT_BLOCK_BYTES, products.FLOAT32_BLOCK_BYTES, products.SPLIT_MIN_MACS = cb, fb, split
            products.set_threads(threads)
            products.set_bfloat16_conversion(CONVERSION_VARIANTS.get(v.rpartition("-")[2]))
            products.DECODE_BY_HALVES = v != "chosen-rows"
            products.HALVES_BLOCK_BYTES = HALVES_SIZES.get(v, halves_block)
            for dtype, ws in weights.items():
                for T in token_counts:
                    t0 = time.perf_counter()
                    for w in ws:
                        products.linear(inputs[T][w.shape[1]], w)
                    times[v, dtype, T].append(time.perf_counter() - t0)
    gb = {dtype: sum(w.nbytes for w in ws) / 1e9 for dtype, ws in weights.items()}

    products.set_bfloat16_conversion(None)
    print(f"bfloat16 conversion chosen by timing: {products.bfloat16_conversion()} (ml_dtypes {ml_dtypes.__version__})")
    print(f"{args.shape}: {len(shapes)} products per token; {gb['float32']:.2f} GB float32, "
          f"{gb['bfloat16']:.2f} GB bfloat16; medians of {args.rounds} rounds")
    print(f"{'variant':12s} {'f32 decode ms':>13s} {'GB/s':>6s} {'bf16 decode ms':>14s} {'GB/s':>6s} "
          f"{'f32 prefill ms':>14s} {'bf16 prefill ms':>15s} {'bf16 / f32 decode speed':>23s}  (prefill: {P} tokens)")
    for v in names:
        row = [statistics.median(times[v, d, T]) if times.get((v, d, T)) else float("nan")
               for T, d in ((1, "float32"), (1, "bfloat16"), (P, "float32"), (P, "bfloat16"))]
        print(f"{v:12s} {row[0] * 1e3:13.2f} {gb['float32'] / row[0]:6.1f} {row[1] * 1e3:14.2f} "
              f"{gb['bfloat16'] / row[1]:6.1f} {row[2] * 1e3:14.1f} {row[3] * 1e3:15.1f} "
              f"{statistics.median(f / b for f, b in zip(times[v, 'float32', 1], times[v, 'bfloat16', 1])):23.2f}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="default")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--variants", type=lambda s: s.split(","), help=f"comma-separated, from {','.join(VARIANTS)}")
    p.add_argument("--prefill-tokens", type=int, default=256, metavar="T", help="tokens of a prefill chunk "
                   "(default 256, as generation feeds a prompt; 0: decode only)")
    args = p.parse_args(argv)
    return run_tool("measure_products", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
