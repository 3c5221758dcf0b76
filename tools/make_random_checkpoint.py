#!/usr/bin/env python3
"""Write a random bfloat16 checkpoint with the exact shapes of a released Llama 3 model.

For speed and memory work on real sizes without a gated download: the folder is a Hugging Face
checkpoint (config.json, model-0000N-of-0000M.safetensors shards of at most --shard-gb, and
model.safetensors.index.json) that llama3_np and transformers both load. It has no tokenizer:
drive it with token ids (`llama3-np bench`, `generate --tokens`).

Tensors are generated and written one at a time, so writing an 8B checkpoint (16 GB) needs little
memory. Weights are N(0, 0.02²) like a fresh initialisation, norms are 1; q/k rows are random
either way, so no rope permutation is needed. Same shape and seed: same bytes.

    python tools/make_random_checkpoint.py SHAPE OUT_DIR [--seed S] [--shard-gb G]
    SHAPE: llama3.2-1b | llama3.2-3b | llama3.1-8b   (default OUT_DIR: weights/random-SHAPE)
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

from tool_support import REPO, run_tool  # first: it makes this checkout's llama3_np importable

import ml_dtypes
import numpy as np

from llama3_np.formats.checkpoint import expected_shapes, hf_config_dict, hf_name
from llama3_np.config import LLAMA31_CONTEXT, LLAMA3_ORIGINAL_CONTEXT, ModelConfig, RopeScaling

# The published configurations (the config.json of each Hugging Face repository).
SHAPES = {
    "llama3.2-1b": ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, ffn_dim=8192,
                               vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0,
                               rope_scaling=RopeScaling(32.0, 1.0, 4.0, LLAMA3_ORIGINAL_CONTEXT),
                               max_seq_len=LLAMA31_CONTEXT, tie_embeddings=True),
    "llama3.2-3b": ModelConfig(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, head_dim=128, ffn_dim=8192,
                               vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0,
                               rope_scaling=RopeScaling(32.0, 1.0, 4.0, LLAMA3_ORIGINAL_CONTEXT),
                               max_seq_len=LLAMA31_CONTEXT, tie_embeddings=True),
    "llama3.1-8b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336,
                               vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0,
                               rope_scaling=RopeScaling(8.0, 1.0, 4.0, LLAMA3_ORIGINAL_CONTEXT),
                               max_seq_len=LLAMA31_CONTEXT, tie_embeddings=False),
}
WEIGHT_STD = 0.02
BF16 = np.dtype(ml_dtypes.bfloat16)


def hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> shape, tied output stored once (as Hugging Face does)."""
    return {hf_name(name): shape for name, shape in expected_shapes(config).items()
            if not (name == "output.weight" and config.tie_embeddings)}


def shard_plan(shapes: dict[str, tuple[int, ...]], shard_bytes: int) -> list[list[str]]:
    """Tensors in name order, cut into consecutive groups of at most `shard_bytes` (one tensor
    larger than that gets a file of its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name in sorted(shapes):
        nbytes = int(np.prod(shapes[name])) * BF16.itemsize
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def random_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) == 1:  # rmsnorm weights
        return np.ones(shape, BF16)
    out = np.empty(shape, BF16)
    rows = max(1, (1 << 24) // shape[1])  # generate 16M values at a time
    for start in range(0, shape[0], rows):
        block = rng.standard_normal((min(rows, shape[0] - start), shape[1]), dtype=np.float32)
        out[start:start + rows] = block * np.float32(WEIGHT_STD)
    return out


def write_shard(path: Path, names: list[str], shapes: dict[str, tuple[int, ...]], rng: np.random.Generator):
    """A safetensors file written tensor by tensor: header first (all sizes are known), then data."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        nbytes = int(np.prod(shapes[name])) * BF16.itemsize
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in names:
            f.write(random_tensor(rng, name, shapes[name]).view(np.uint16).tobytes())


def make_random_checkpoint(shape: str, out: Path, seed: int = 0, shard_gb: float = 5.0) -> Path:
    config = SHAPES[shape]
    out.mkdir(parents=True, exist_ok=True)
    shapes = hf_shapes(config)
    groups = shard_plan(shapes, int(shard_gb * 1e9))
    rng = np.random.default_rng(seed)
    weight_map = {}
    for k, names in enumerate(groups):
        file_name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        print(f"writing {out / file_name} ({len(names)} tensors)", file=sys.stderr)
        write_shard(out / file_name, names, shapes, rng)
        weight_map.update({name: file_name for name in names})
    total = sum(int(np.prod(s)) * BF16.itemsize for s in shapes.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    # config.json last: a folder without it is visibly incomplete.
    (out / "config.json").write_text(json.dumps(dict(hf_config_dict(config), bos_token_id=128000,
                                                     eos_token_id=128001), indent=2) + "\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out", nargs="?", type=Path, help="output folder (default: weights/random-SHAPE)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-gb", type=float, default=5.0, help="largest shard file, in GB (default 5)")
    args = p.parse_args(argv)
    out = args.out or REPO / "weights" / f"random-{args.shape}"
    return run_tool("make_random_checkpoint",
                    lambda: print(make_random_checkpoint(args.shape, out, args.seed, args.shard_gb)))


if __name__ == "__main__":
    sys.exit(main())
