#!/usr/bin/env python3
"""Peak memory of the two residencies, and that they compute the same logits.

    python tools/measure_residency.py [-m DIR]

Without -m, writes a random bf16 Hugging Face checkpoint of about 1.7 GB (D=2048, 16 layers, 16
heads / 4 KV heads, F=5632, V=32000, 2 shards) to weights/residency-check/ once and uses it. Then,
for each residency, a fresh Python process loads the checkpoint, runs an 8-token prompt and 4
decoded tokens, and reports its peak RSS (VmHWM; see `peak_rss_bytes`). Prints both peaks, their ratio
(bfloat16 / float32; the target is at most 0.6) and the NMSE between the two runs' logits (the
target is at most 1e-10). Exit status 1 when a target is missed. Not a test: it takes a minute and
its numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from tool_support import REPO, run_tool  # first: it makes this checkout's llama3_np importable

from llama3_np.formats.checkpoint import expected_shapes, load_checkpoint, save_hf_checkpoint
from llama3_np.config import ModelConfig

DEFAULT_DIR = REPO / "weights" / "residency-check"
CONFIG = ModelConfig(dim=2048, n_layers=16, n_heads=16, n_kv_heads=4, head_dim=128, ffn_dim=5632,
                     vocab_size=32000, norm_eps=1e-5, rope_theta=500000.0, rope_scaling=None, max_seq_len=8192,
                     tie_embeddings=False)
PROMPT = [1, 450, 3681, 7601, 20937, 526, 2654, 29892]
DECODE = 4
TARGET_RATIO, TARGET_NMSE = 0.6, 1e-10


def make_checkpoint(folder: Path):
    rng = np.random.default_rng(0)
    weights = {name: (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1])).astype(ml_dtypes.bfloat16)
               if len(shape) == 2 else np.ones(shape, ml_dtypes.bfloat16)
               for name, shape in expected_shapes(CONFIG).items()}
    save_hf_checkpoint(folder, CONFIG, weights, shards=2)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started.

    Linux's getrusage ru_maxrss survives fork + exec, so a child would report its parent's peak
    when that was higher; /proc/self/status VmHWM belongs to this process image alone.
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(folder: Path, residency: str, logits_out: Path) -> int:
    """Runs in its own process, so its peak RSS is this residency's alone."""
    from llama3_np.model import KVCache, forward
    t0 = time.perf_counter()
    ckpt = load_checkpoint(folder, dtype=residency)
    t1 = time.perf_counter()
    cache = KVCache(ckpt.config, len(PROMPT) + DECODE)
    rows = [forward(ckpt.weights, ckpt.config, PROMPT, cache=cache)]
    for step in range(DECODE):
        next_id = int(np.argmax(rows[-1][-1]))
        rows.append(forward(ckpt.weights, ckpt.config, [next_id], cache=cache, pos=len(PROMPT) + step))
    np.save(logits_out, np.concatenate(rows))
    print(json.dumps({"peak_rss_bytes": peak_rss_bytes(),
                      "load_seconds": t1 - t0, "run_seconds": time.perf_counter() - t1}))
    return 0


def measure(folder: Path) -> int:
    stored = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    print(f"checkpoint: {folder} ({stored / 1e9:.2f} GB of safetensors)")
    results, logits = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for residency in ("float32", "bfloat16"):
            out = Path(tmp) / f"{residency}.npy"
            run = subprocess.run([sys.executable, __file__, "--child", residency, "-m", str(folder), "--logits", str(out)],
                                 check=True, capture_output=True, text=True)
            results[residency] = json.loads(run.stdout.strip().splitlines()[-1])
            logits[residency] = np.load(out).astype(np.float64)
            r = results[residency]
            print(f"{residency:>8} residency: peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB "
                  f"(load {r['load_seconds']:.1f} s, {len(PROMPT)} + {DECODE} tokens {r['run_seconds']:.1f} s)")
    ratio = results["bfloat16"]["peak_rss_bytes"] / results["float32"]["peak_rss_bytes"]
    ref = logits["float32"]
    nmse = float(np.sum((logits["bfloat16"] - ref) ** 2) / np.sum(ref ** 2))
    print(f"peak RSS ratio bfloat16 / float32: {ratio:.3f} (target <= {TARGET_RATIO})")
    print(f"logits NMSE bfloat16 vs float32 residency: {nmse:.3e} (target <= {TARGET_NMSE:.0e})")
    return 0 if ratio <= TARGET_RATIO and nmse <= TARGET_NMSE else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", type=Path, help=f"checkpoint folder (default: make one in {DEFAULT_DIR})")
    parser.add_argument("--child", choices=["float32", "bfloat16"], help=argparse.SUPPRESS)
    parser.add_argument("--logits", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.model, args.child, args.logits)
    folder = args.model or DEFAULT_DIR
    if args.model is None and not (folder / "model.safetensors.index.json").is_file():
        print(f"writing a random {CONFIG.n_layers}-layer checkpoint to {folder} ...")
        make_checkpoint(folder)
    return measure(folder)


if __name__ == "__main__":
    sys.exit(run_tool("measure_residency", lambda: main()))
