#!/usr/bin/env python3
"""What bounds bfloat16 emulation on a deep model: how often one bfloat16 weight product, as torch
computes it on this CPU, differs from the correctly rounded value and from llama3_np's, whether
torch's own bits depend on its kernel, and whether a float32 summation order reproduces them.

    python tools/measure_bf16_products.py [-m MODEL] [--tokens 32] [--markdown]
    python tools/measure_bf16_products.py --spread
    python tools/measure_bf16_products.py --greedy [--hf-model weights/default-exact]

The inputs are real: the stages of llama3_np in bfloat16 mode on the default model (the first
`--tokens` tokens of tests/fixtures/xcheck/jargon_hack.txt), at layers 0 and 15 and the final norm:
`attn_norm` into wq, wk, wv; `attn` into wo; `ffn_norm` into w1, w3; `ffn_hidden` into w2; `norm`
into the output matrix (its first 8192 rows). Each product's output is rounded to bfloat16:

- exact: the sum in float64 (exact products, error far below half a bfloat16 ulp), then rounded;
- llama3_np: `linear` (float32 sum, OpenBLAS's order), then rounded, as bfloat16 mode computes it;
- torch: `F.linear` on bfloat16 tensors, one thread, in a child process per kernel choice
  (`KERNELS`): torch's default on this CPU (oneDNN's brg_matmul on AMX tiles), oneDNN limited to
  AVX-512 BF16 (`vdpbf16ps`), to AVX-512 without BF16 or to AVX2 (where torch falls back to its own
  kernel): the paths torch takes on CPUs without those instructions, selected by
  DNNL_MAX_CPU_ISA (ONEDNN_VERBOSE=1 shows the primitive each runs); torch's own kernel with oneDNN
  switched off; and two threads;
- emulations of candidate float32 orders in NumPy: a sequential sum over k, and the pairwise order
  of `vdpbf16ps` (per pair of k, both products added to the float32 accumulator, odd index first,
  each addition rounded; or each pair summed exactly, then added with one rounding).

Then how one such difference spreads (`--spread`): llama3_np in bfloat16 mode on the same tokens,
once as computed and once with a single element of layer 0's `ffn_out` moved by one bfloat16 ulp
(at the last token, in each of `SITES` places); per layer, the fraction of the last token's
residual stream (`out`) that differs and its NMSE against the unmoved run (median over the sites).

And whether the target itself holds still (`--greedy`): transformers' own bfloat16 greedy
continuations of tests/fixtures/default_model/greedy_low_precision.json's 20 prompts (64 tokens,
tools/make_precision_reference.py's loop) under each of the first four kernel choices, against the
committed ones.

Prints, per product and in total, the fraction of outputs where each pair differs (one bfloat16
ulp, in practice); `--markdown` prints the table of BENCHMARKS.md ("What bounds bfloat16 emulation").
Needs the tools extra (torch==2.13.0).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tool_support import REPO, run_tool  # first: it makes this checkout's llama3_np importable

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from llama3_np.config import ComputeMode  # noqa: E402
from llama3_np.formats.checkpoint import load_checkpoint  # noqa: E402
from llama3_np.linear import linear, mode_weights  # noqa: E402
from llama3_np.model import KVCache, forward  # noqa: E402
from llama3_np.stages import Trace  # noqa: E402
from llama3_np.assets import default_model  # noqa: E402
from llama3_np.load import load_tokenizer  # noqa: E402

BF16 = ml_dtypes.bfloat16
TEXT = REPO / "tests" / "fixtures" / "xcheck" / "jargon_hack.txt"
# product name: (stage that is its input, weight)
PRODUCTS = {
    **{f"layers.{i}.{w}": (f"layers.{i}.{stage}", f"layers.{i}.{weight}")
       for i in (0, 15)
       for w, stage, weight in (("wq", "attn_norm", "attention.wq.weight"), ("wk", "attn_norm", "attention.wk.weight"),
                                ("wv", "attn_norm", "attention.wv.weight"), ("wo", "attn", "attention.wo.weight"),
                                ("w1", "ffn_norm", "feed_forward.w1.weight"), ("w3", "ffn_norm", "feed_forward.w3.weight"),
                                ("w2", "ffn_hidden", "feed_forward.w2.weight"))},
    "output": ("norm", "output.weight"),
}
OUTPUT_ROWS = 8192
# kernel choice: environment of the child process, and whether oneDNN is on
KERNELS = {
    "torch default here (oneDNN brg_matmul, AMX)": ({}, True),
    "oneDNN AVX-512 BF16, no AMX (as on Cooper Lake, Zen 4)": ({"DNNL_MAX_CPU_ISA": "AVX512_CORE_BF16"}, True),
    "oneDNN AVX-512 without BF16 (gemm:jit:bf16, as on Skylake-X, Ice Lake)": ({"DNNL_MAX_CPU_ISA": "AVX512_CORE"}, True),
    "oneDNN capped at AVX2 (torch's own kernel, as on Zen 2, Zen 3)": ({"DNNL_MAX_CPU_ISA": "AVX2"}, True),
    "torch without oneDNN": ({}, False),
    "torch default, 2 threads": ({"THREADS": "2"}, True),
}
GREEDY_KERNELS = list(KERNELS)[:4]  # the CPU classes; --greedy runs each over 20 prompts


def rounded(x: np.ndarray) -> np.ndarray:
    return x.astype(BF16).astype(np.float32)


def inputs(model: Path, n_tokens: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """product -> (x [T, K] bfloat16 values as float32, w [N, K] likewise)."""
    ckpt = load_checkpoint(model, dtype="bfloat16")
    mode = ComputeMode("bfloat16")
    weights = mode_weights(ckpt.weights, mode)
    ids = load_tokenizer(model).encode(TEXT.read_text(encoding="utf-8"))[:n_tokens]
    trace = Trace()
    forward(weights, ckpt.config, ids, KVCache(ckpt.config, len(ids), mode), trace=trace)
    out = {}
    for name, (stage, weight) in PRODUCTS.items():
        w = np.asarray(weights.get(weight, weights["tok_embeddings.weight"]), np.float32)
        if name == "output":
            w = w[:OUTPUT_ROWS]
        out[name] = (np.ascontiguousarray(np.asarray(trace[stage], np.float32).reshape(len(ids), -1)), w)
    return out


def sequential(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """float32 sum over k in order, every addition rounded (the products are exact in float32)."""
    acc = np.zeros((x.shape[0], w.shape[0]), np.float32)
    for k in range(x.shape[1]):
        acc += x[:, k:k + 1] * w[None, :, k]
    return acc


def dpbf16(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """vdpbf16ps's order as Intel's pseudo-code gives it: per pair (2i, 2i+1), the product of the odd
    index added to the float32 accumulator, then the even one, each addition rounded."""
    acc = np.zeros((x.shape[0], w.shape[0]), np.float32)
    for k in range(0, x.shape[1], 2):
        acc += x[:, k + 1:k + 2] * w[None, :, k + 1]
        acc += x[:, k:k + 1] * w[None, :, k]
    return acc


def dpbf16_exact_pairs(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The other reading of vdpbf16ps: each pair's two products summed exactly, then added to the
    float32 accumulator with one rounding."""
    acc = np.zeros((x.shape[0], w.shape[0]), np.float32)
    for k in range(0, x.shape[1], 2):
        pair = x[:, k:k + 1].astype(np.float64) * w[None, :, k] + x[:, k + 1:k + 2].astype(np.float64) * w[None, :, k + 1]
        acc = (acc + pair).astype(np.float32)
    return acc


def torch_child(path: str, use_mkldnn: bool) -> None:
    """In a child process: F.linear of every product of the .npz at `path`, written beside it."""
    import torch
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    data = np.load(path)
    out = {}
    with torch.backends.mkldnn.flags(enabled=use_mkldnn), torch.no_grad():
        for name in PRODUCTS:
            x = torch.from_numpy(data[f"{name}.x"]).to(torch.bfloat16)
            w = torch.from_numpy(data[f"{name}.w"]).to(torch.bfloat16)
            out[name] = torch.nn.functional.linear(x, w).float().numpy()
    np.savez(path + ".torch.npz", **out)


def torch_runs(data: dict, tmp: Path) -> dict[str, dict[str, np.ndarray]]:
    path = tmp / "inputs.npz"
    np.savez(path, **{f"{n}.{k}": v for n, (x, w) in data.items() for k, v in (("x", x), ("w", w))})
    runs = {}
    for kernel, (env, use_mkldnn) in KERNELS.items():
        child_env = {**os.environ, "OMP_NUM_THREADS": env.get("THREADS", "1"), **env}
        subprocess.run([sys.executable, __file__, "--child", str(path), "--mkldnn", str(int(use_mkldnn))],
                       env=child_env, check=True)
        with np.load(str(path) + ".torch.npz") as f:
            runs[kernel] = {n: f[n] for n in PRODUCTS}
    return runs


SITES = 8


def spread(model: Path, n_tokens: int) -> list[tuple[int, float, float]]:
    """(layer, median fraction of the last token's `out` that differs, median NMSE) per layer."""
    from llama3_np.stages import Edit
    ckpt = load_checkpoint(model, dtype="bfloat16")
    mode = ComputeMode("bfloat16")
    weights = mode_weights(ckpt.weights, mode)
    ids = load_tokenizer(model).encode(TEXT.read_text(encoding="utf-8"))[:n_tokens]
    names = [f"layers.{i}.out" for i in range(ckpt.config.n_layers)]
    base = Trace(names + ["layers.0.ffn_out"])
    forward(weights, ckpt.config, ids, compute=mode, trace=base)
    ffn_out = np.asarray(base["layers.0.ffn_out"], np.float32)
    rng = np.random.default_rng(0)
    rows = []
    for j in rng.choice(ffn_out.shape[1], SITES, replace=False):
        moved = ffn_out.copy()
        v = moved[-1, j].astype(BF16)
        moved[-1, j] = np.nextafter(v, BF16(np.inf) if v >= 0 else BF16(-np.inf)).astype(np.float32)
        trace = Trace(names, edits=[Edit("layers.0.ffn_out", "replace", moved)])
        forward(weights, ckpt.config, ids, compute=mode, trace=trace)
        rows.append([(float(np.mean(trace[n][-1] != base[n][-1])),
                      float(np.sum((trace[n][-1].astype(np.float64) - base[n][-1]) ** 2) /
                            np.sum(base[n][-1].astype(np.float64) ** 2))) for n in names])
    return [(i, float(np.median([r[i][0] for r in rows])), float(np.median([r[i][1] for r in rows])))
            for i in range(len(names))]


GREEDY = REPO / "tests" / "fixtures" / "default_model" / "greedy_low_precision.json"


def greedy_child(model: str, out: str) -> None:
    """In a child process: transformers' bfloat16 greedy continuations of GREEDY's prompts, as
    tools/make_precision_reference.py computes them, under this process's oneDNN settings."""
    import json
    import torch
    sys.path.insert(0, str(REPO / "tools"))
    import make_precision_reference as mpr
    import torch_reference as ref
    ref.deterministic_torch(int(os.environ.get("THREADS", "1")))
    hf = ref.load_hf(model, torch.bfloat16)
    cases = json.loads(GREEDY.read_text())["prompts"]
    got = {}
    for c in cases:
        got[c["name"]] = mpr.hf_greedy(hf, c["prompt_ids"])[0]
        Path(out).write_text(json.dumps(got))  # after each prompt: a long run can be read as it goes
        print(f"  {c['name']}", flush=True)


def greedy_across_kernels(model: Path, kernels: list[str]) -> dict[str, tuple[int, list[str]]]:
    """kernel -> (prompts whose 64 greedy ids equal the committed transformers bfloat16 ones, the
    others as 'name@first differing position')."""
    import json
    committed = {c["name"]: c["ids"] for c in json.loads(GREEDY.read_text())["producers"]["hf_bf16"]["cases"]}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kernel in kernels:
            env, use_mkldnn = KERNELS[kernel]
            path = Path(tmp) / "greedy.json"
            child_env = {**os.environ, "OMP_NUM_THREADS": env.get("THREADS", "1"), **env}
            subprocess.run([sys.executable, __file__, "--greedy-child", str(path), "--hf-model", str(model),
                            "--mkldnn", str(int(use_mkldnn))], env=child_env, check=True)
            got = json.loads(path.read_text())
            parted = [f"{name}@{next(i for i, (a, b) in enumerate(zip(ids, committed[name])) if a != b)}"
                      for name, ids in got.items() if ids != committed[name]]
            out[kernel] = (len(got) - len(parted), parted)
            print(f"{kernel}: {out[kernel][0]} of {len(got)} as committed; parted: {', '.join(parted) or 'none'}",
                  flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", help="llama3_np's model (default: the default model's GGUF)")
    p.add_argument("--hf-model", default=str(REPO / "weights" / "default-exact"),
                   help="transformers' copy of it, for --greedy (default: %(default)s, `make fixtures` writes it)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--spread", action="store_true", help="only the spread of one ulp through the layers")
    p.add_argument("--greedy", action="store_true",
                   help="only transformers' own bfloat16 greedy continuations under each kernel choice, against "
                        "the committed ones (tests/fixtures/default_model/greedy_low_precision.json)")
    p.add_argument("--kernels", default="0,1,2,3", metavar="I,J",
                   help="with --greedy: which of the first four kernel choices (default all: 0,1,2,3)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--greedy-child", help=argparse.SUPPRESS)
    p.add_argument("--mkldnn", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.model = args.model or str(default_model())
    if args.child or args.greedy_child:
        import torch
        with torch.backends.mkldnn.flags(enabled=bool(args.mkldnn)):
            if args.child:
                torch_child(args.child, bool(args.mkldnn))
            else:
                greedy_child(args.hf_model, args.greedy_child)
        return 0
    if args.greedy:
        greedy_across_kernels(Path(args.hf_model), [GREEDY_KERNELS[int(i)] for i in args.kernels.split(",")])
        return 0
    if args.spread:
        rows = spread(Path(args.model), args.tokens)
        print("| layer | " + " | ".join(str(i) for i, _, _ in rows) + " |\n|---|" + "---|" * len(rows))
        print("| elements of `out` that differ | " + " | ".join(f"{100 * f:.1f}%" for _, f, _ in rows) + " |")
        print("| NMSE | " + " | ".join(f"{e:.0e}" for _, _, e in rows) + " |")
        return 0
    data = inputs(Path(args.model), args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        runs = torch_runs(data, Path(tmp))
    default = next(iter(KERNELS))
    columns = ["llama3_np vs exact", *(f"{k} vs exact" for k in KERNELS), *(f"{k} vs torch default" for k in
               list(KERNELS)[1:]), "llama3_np vs torch default", "sequential vs torch default",
               "vdpbf16ps order vs torch default", "exact pairs vs torch default"]
    rows, totals = [], {c: [0, 0] for c in columns}
    for name, (x, w) in data.items():
        exact = rounded((x.astype(np.float64) @ w.astype(np.float64).T).astype(np.float32))
        ours = rounded(linear(x, w))
        got = {"exact": exact, "llama3_np": ours, "sequential": rounded(sequential(x, w)),
               "vdpbf16ps order": rounded(dpbf16(x, w)),
               "exact pairs": rounded(dpbf16_exact_pairs(x, w)), **{k: v[name] for k, v in runs.items()}}
        row = {}
        for c in columns:
            a, b = c.split(" vs ")
            diff = int(np.sum(got[a] != got[b if b != "torch default" else default]))
            row[c] = diff / exact.size
            totals[c][0] += diff
            totals[c][1] += exact.size
        rows.append((f"{name} [{x.shape[0]}x{x.shape[1]}]·[{w.shape[1]}x{w.shape[0]}]", row))
    rows.append(("all", {c: d / n for c, (d, n) in totals.items()}))
    if args.markdown:
        n = totals[columns[0]][1]
        print(f"| outputs rounded to bfloat16 that differ (of {n:,}: {args.tokens} tokens, {len(data)} products) | "
              "count | fraction |\n|---|---|---|")
        for c in columns:
            print(f"| {c} | {totals[c][0]} | {100 * totals[c][0] / n:.4f}% |")
    else:
        for name, row in rows:
            print(name)
            for c in columns:
                print(f"    {c:<60} {100 * row[c]:8.4f}% of outputs differ")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("measure_bf16_products", main))
