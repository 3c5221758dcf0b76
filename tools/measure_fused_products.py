#!/usr/bin/env python3
"""Time whole decode steps (and prefill chunks) of a model with fused products (q, k, v and gate,
up each one product on joined weights, `linear.fuse_projections`) against separate ones, in
paired, interleaved rounds (BENCHMARKS.md, "Threads and blocks").

    python tools/measure_fused_products.py [-m MODEL] [--dtype float32|bfloat16] [-t 1,2]
        [--rounds N] [--steps N] [--prompt N] [--split-min MACS,...]
    python tools/measure_fused_products.py --values [-m MODEL]

One process holds the weights twice: as `load_model` holds them (fused) and with each fused
group copied back into separate arrays. Each round runs, for every thread count and variant in
turn, a prefill of --prompt tokens and --steps decode steps after it; the figures are the medians
over rounds of each variant's time per decode step and per prefill token, and the median over
rounds of each round's ratio to the first variant (separate products, the split threshold of
products.py). --split-min adds variants of the fused weights with products.SPLIT_MIN_MACS set to
each value. Also prints the peak RSS and load time of the process (fused at load). Not a test: its
numbers depend on the machine and on what else runs on it.

--values measures instead how far fused products are from separate ones (docs/DESIGN.md, "Fused
products"): for float32 and bfloat16 weights, 1 and 2 threads, one row (a decode step, the products
`linear.linears` fuses) and, with --rows, more (the product of the joined array, which `linears`
does not run for several rows), the largest |fused - separate| over every layer's q/k/v and gate/up,
in units of the float32 dot-product bound γ_n·|x|·|w| (u = 2⁻²⁴), and whether they are
bit-identical; then the NMSE of the logits of a prefill and decode steps, fused against separate,
in float32 and bfloat16 compute.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

from tool_support import run_tool  # first: it makes this checkout's llama3_np importable

import numpy as np

from llama3_np import products
from llama3_np.config import ComputeMode
from llama3_np.dtypes import bfloat16
from llama3_np.formats.canonical import JOINED
from llama3_np.linear import fuse_projections, mode_weights
from llama3_np.load import load_model
from llama3_np.model import KVCache, forward


def separate(weights: dict, n_layers: int) -> dict:
    """The weights with each fused group copied into arrays of their own."""
    out = dict(weights)
    for layer in range(n_layers):
        for group in JOINED:
            for name in group:
                key = f"layers.{layer}.{name}.weight"
                out[key] = np.array(weights[key])
    return out


def time_variant(weights, config, prompt, steps: int, compute) -> tuple[float, float]:
    """Seconds per prefill token and per decode step of one prefill and `steps` greedy steps."""
    cache = KVCache(config, len(prompt) + steps + 1, compute)
    t0 = time.perf_counter()
    logits = forward(weights, config, prompt, cache, last_only=True)
    t1 = time.perf_counter()
    for _ in range(steps):
        logits = forward(weights, config, [int(np.argmax(logits[-1]))], cache)
    t2 = time.perf_counter()
    return (t1 - t0) / len(prompt), (t2 - t1) / steps


def nmse(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sum((a - b) ** 2) / np.sum(b ** 2))


def values(args) -> int:
    model = load_model(args.model, need_tokenizer=False)
    config, fused = model.config, model.weights
    rng = np.random.default_rng(0)
    u = 2.0 ** -24
    print("weights   threads  T  max |fused - separate| / (γ_n |x||w|)  bit-identical")
    for dtype in (np.float32, bfloat16()):
        joined = dict(fused) if dtype == np.float32 else {k: v.astype(dtype) for k, v in separate(fused, config.n_layers).items()}
        fuse_projections(joined, config.n_layers)
        for threads in (1, 2):
            products.set_threads(threads)
            for T in (1, *args.rows):
                worst, identical = 0.0, True
                x = rng.normal(size=(T, config.dim)).astype(np.float32)
                for layer in range(config.n_layers):
                    for group in JOINED:
                        ws = [joined[f"layers.{layer}.{name}.weight"] for name in group]
                        whole = ws[0].base
                        y, start = products.linear(x, whole), 0  # the one product, whatever T
                        for w in ws:
                            got, start = y[:, start:start + w.shape[0]], start + w.shape[0]
                            alone = products.linear(x, np.array(w))
                            n = x.shape[1]
                            bound = n * u / (1 - n * u) * (np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T)
                            worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - alone) / bound)))
                            identical &= bool(np.array_equal(got, alone))
                print(f"{np.dtype(dtype).name:<9} {threads:>7} {T:>2}  {worst:>38.3g}  {identical}")
    products.set_threads(1)
    prompt = list(rng.integers(0, config.vocab_size, 16))
    for compute in ("float32", "bfloat16"):
        mode = ComputeMode(compute)
        split = mode_weights(separate(fused, config.n_layers), mode)
        joined = dict(split)
        fuse_projections(joined, config.n_layers)
        worst = 0.0
        caches = {name: KVCache(config, len(prompt) + 8, mode) for name in ("fused", "separate")}
        tokens = prompt
        for _ in range(8):
            a = forward(joined, config, tokens, caches["fused"])
            b = forward(split, config, tokens, caches["separate"])
            worst = max(worst, nmse(a, b))
            tokens = [int(np.argmax(b[-1]))]
        print(f"logits, compute {compute}: largest NMSE fused vs separate over a {len(prompt)}-token prefill "
              f"and 7 decode steps: {worst:.3g}")
    return 0


def run(args) -> int:
    if args.values:
        return values(args)
    t0 = time.perf_counter()
    model = load_model(args.model, dtype=args.dtype, compute=args.compute, need_tokenizer=False)
    load_seconds = time.perf_counter() - t0
    rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    config, fused = model.config, model.weights
    split = separate(fused, config.n_layers)
    default_split = products.SPLIT_MIN_MACS
    variants = {"separate": (split, default_split), "fused": (fused, default_split)}
    for macs in args.split_min:
        variants[f"fused-split{macs}"] = (fused, macs)
    prompt = list(np.random.default_rng(0).integers(0, config.vocab_size, args.prompt))
    results = {(t, name): ([], []) for t in args.threads for name in variants}
    for _ in range(args.warmup):
        for t in args.threads:
            products.set_threads(t)
            for weights, _ in variants.values():
                time_variant(weights, config, prompt[:8], 2, model.compute)
    for _ in range(args.rounds):
        for t in args.threads:
            products.set_threads(t)
            for name, (weights, macs) in variants.items():
                products.SPLIT_MIN_MACS = macs
                prefill, decode = time_variant(weights, config, prompt, args.steps, model.compute)
                results[t, name][0].append(prefill)
                results[t, name][1].append(decode)
        products.SPLIT_MIN_MACS = default_split
    print(f"model {model.checkpoint.path.name}, dtype {model.checkpoint.dtype}, compute {model.compute.dtype}; "
          f"load {load_seconds:.2f} s (fused at load), peak RSS after load {rss_after_load:.0f} MiB; "
          f"{args.rounds} rounds of a {args.prompt}-token prefill and {args.steps} decode steps; "
          f"SPLIT_MIN_MACS {default_split}")
    print(f"{'threads':>7} {'variant':<22} {'decode ms/step':>14} {'ratio':>6} {'tok/s':>7} "
          f"{'prefill tok/s':>13} {'ratio':>6}")
    for t in args.threads:
        base_prefill, base_decode = results[t, "separate"]
        for name in variants:
            prefill, decode = results[t, name]
            decode_ratio = statistics.median(b / d for b, d in zip(base_decode, decode))
            prefill_ratio = statistics.median(b / p for b, p in zip(base_prefill, prefill))
            print(f"{t:>7} {name:<22} {1e3 * statistics.median(decode):>14.2f} {decode_ratio:>6.3f} "
                  f"{1 / statistics.median(decode):>7.1f} {1 / statistics.median(prefill):>13.1f} {prefill_ratio:>6.3f}")
    print("ratio: the median over rounds of the separate products' time over the variant's (> 1: faster)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", metavar="PATH", help="checkpoint (default: the default model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="weight residency")
    p.add_argument("--compute", default="float32", help="compute mode (float32, bfloat16, ...)")
    p.add_argument("-t", "--threads", type=lambda s: [int(n) for n in s.split(",")], default=[1, 2])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--values", action="store_true", help="measure the values, not the time")
    p.add_argument("--rows", type=lambda s: [int(n) for n in s.split(",")], default=[],
                   help="with --values: also products of this many rows")
    p.add_argument("--split-min", type=lambda s: [int(n) for n in s.split(",")], default=[],
                   help="SPLIT_MIN_MACS values to try with the fused weights")
    return run_tool("measure_fused_products", lambda: run(p.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
