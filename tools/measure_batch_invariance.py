#!/usr/bin/env python3
"""Measure how far a sequence's logits in a batch (`model.forward_batch`) are from its logits alone
(`model.forward`), on the default model, and where the difference comes from (docs/DESIGN.md,
"Batches"; the bound of tests/test_batch.py).

    python tools/measure_batch_invariance.py [--steps N] [--threads N] [-m DIR ...]

Eight prompts (the three of tests/fixtures/default_model/greedy.json and five more of 1 to 60
tokens) are prefilled together and then decoded greedily together, one `forward_batch` per step,
and each alone, one `forward` per step; it prints, as JSON, the NMSE of the batched logits against
the alone ones (prefill and decode steps apart, worst and median over sequences), whether every
greedy id agrees, the same with batch-invariant products (`products.set_batch_invariant(True)`,
expected bit-equal), and for comparison the NMSE between a matrix-vector and a matrix-matrix
product of one row by the default model's largest weight, which is the source of the difference,
and the fraction of 8 rows' outputs that the two multi-row kernels (x · wᵀ and (w · xᵀ)ᵀ,
`products.TRANSPOSED_MAX_ROWS`) give bit-equal.
-m DIR (repeatable) measures those checkpoints instead, e.g. the tests' tiny ones
(tests/fixtures/parity/llama3_0, _1, _2), the prompts' ids taken modulo their vocabulary. Another
CPU's OpenBLAS kernels: OPENBLAS_CORETYPE=Haswell (as on Zen 2/3) in the environment.
Not a timing: the numbers depend only on the CPU's float32 kernels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from tool_support import REPO, run_tool  # first: it makes this checkout's llama3_np importable

import numpy as np

from llama3_np import products
from llama3_np.assets import default_model
from llama3_np.formats.checkpoint import load_checkpoint
from llama3_np.model import KVCache, forward, forward_batch

EXTRA_PROMPTS = [[1], list(range(200, 260)), [42, 42, 42, 42], list(range(1000, 1030, 3)), [4000, 17, 9, 12000, 3]]


def nmse(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.sum((ours - ref) ** 2) / np.sum(ref ** 2))


def run(weights, config, prompts, steps):
    """Per sequence: (alone logits per step, batched logits per step), greedy continuations each."""
    alone = []
    for p in prompts:
        cache = KVCache(config, len(p) + steps)
        out = [forward(weights, config, p, cache)]
        for _ in range(steps):
            out.append(forward(weights, config, [int(np.argmax(out[-1][-1]))], cache))
        alone.append(out)
    caches = [KVCache(config, len(p) + steps) for p in prompts]
    step = forward_batch(weights, config, prompts, caches)
    batched = [[x] for x in step]
    for _ in range(steps):
        step = forward_batch(weights, config, [[int(np.argmax(x[-1]))] for x in step], caches)
        for b, x in enumerate(step):
            batched[b].append(x)
    return alone, batched


def summary(alone, batched) -> dict:
    prefill = [nmse(b[0], a[0]) for a, b in zip(alone, batched)]
    decode = [max(nmse(x, y) for x, y in zip(b[1:], a[1:])) for a, b in zip(alone, batched)]
    same_ids = all(int(np.argmax(x[-1])) == int(np.argmax(y[-1])) for a, b in zip(alone, batched) for x, y in zip(b, a))
    bit_equal = all(np.array_equal(x, y) for a, b in zip(alone, batched) for x, y in zip(b, a))
    return {"prefill_nmse_worst": max(prefill), "prefill_nmse_median": statistics.median(prefill),
            "decode_nmse_worst": max(decode), "decode_nmse_median": statistics.median(decode),
            "greedy_ids_equal": same_ids, "bit_equal": bit_equal}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=16, help="greedy decode steps after the prompts (default 16)")
    p.add_argument("--threads", type=int, help="llama3_np's threads (default: one per core)")
    p.add_argument("-m", "--model", action="append", help="a checkpoint folder (repeatable; default: the default model)")
    p.add_argument("--transposed-max-rows", type=int, default=products.TRANSPOSED_MAX_ROWS,
                   help="products.TRANSPOSED_MAX_ROWS (default: llama3_np's; 0: every product of several rows as x · wᵀ)")
    args = p.parse_args()
    if args.threads:
        products.set_threads(args.threads)
    products.TRANSPOSED_MAX_ROWS = args.transposed_max_rows
    cases = json.loads((REPO / "tests" / "fixtures" / "default_model" / "greedy.json").read_text())["cases"]
    results = []
    for path in args.model or [default_model()]:
        checkpoint = load_checkpoint(path, dtype="float32")
        config, weights = checkpoint.config, checkpoint.weights
        prompts = [[t % config.vocab_size for t in p] for p in [c["prompt_ids"] for c in cases] + EXTRA_PROMPTS]
        result = {"model": str(path), "prompts": len(prompts), "steps": args.steps, "threads": products.get_threads(),
                  "transposed_max_rows": products.TRANSPOSED_MAX_ROWS,
                  "default": summary(*run(weights, config, prompts, args.steps))}
        products.set_batch_invariant(True)
        result["batch_invariant"] = summary(*run(weights, config, prompts, args.steps))
        products.set_batch_invariant(False)
        w = weights["output.weight"]  # [V, D]
        x = np.random.default_rng(0).standard_normal((8, config.dim), dtype=np.float32)
        result["one_row_gemv_vs_gemm_nmse"] = nmse(np.dot(w, x[0]), (x @ w.T)[0])
        result["one_row_gemv_vs_transposed_gemm_nmse"] = nmse(np.dot(w, x[0]), (w @ x.T)[:, 0])
        result["transposed_gemm_equal_to_gemm"] = float(np.mean((w @ x.T).T == x @ w.T))  # 8 rows: the fraction of bit-equal outputs
        results.append(result)
    print(json.dumps(results if len(results) > 1 else results[0], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("measure_batch_invariance", main))
