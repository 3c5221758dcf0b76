#!/usr/bin/env python3
"""Write a GGUF file with the shapes of a released Llama 3 model and llama.cpp's Q4_K_M choice of
tensor types, its blocks random but valid: for measuring quantized residency (`--dtype gguf`) at
real sizes without a gated download.

    python tools/make_random_gguf.py [SHAPE] [-o FILE] [--seed S]
    SHAPE: llama3.2-1b | llama3.2-3b | llama3.1-8b (default; about 4.9 GB, like a real 8B Q4_K_M)
    default FILE: weights/random-SHAPE.Q4_K_M.gguf (git-ignored, as make_random_checkpoint.py's)

Types, as llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp) picks them for
LLAMA_FTYPE_MOSTLY_Q4_K_M: Q6_K for output.weight, and for attn_v and ffn_down of the layers
`use_more_bits` selects (the first and last eighth of the layers and every third one between),
Q4_K for every other matrix and the embedding, F32 for the norms and rope_freqs (the Llama 3.1
rope scaling factors, `formats.gguf_import.llama3_rope_factors`).

Each block's quantized bits are random bytes; its float16 scales (d, dmin) are drawn so that every
value is finite and about as large as a trained weight (|w| of order 0.02): llama3_np and the
`gguf` package dequantize them like any other. The file carries a placeholder vocabulary of the
shape's size with Llama 3's special tokens where Llama 3 has them, and no merges: drive it with
token ids (`llama3-np generate --tokens ...`). Tensors are generated and written one at a time (the
largest, the embedding, is 0.3 GB). Same shape and seed: same bytes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tool_support import REPO, run_tool  # first: it makes this checkout's llama3_np importable

import gguf
import numpy as np

from make_random_checkpoint import SHAPES
from llama3_np.config import ModelConfig
from llama3_np.formats.canonical import expected_shapes
from llama3_np.formats.ggml_blocks import SUPPORTED
from llama3_np.formats.gguf_import import LLAMA3_SPECIAL_AT, gguf_name, llama3_rope_factors

BY_NAME = {t.name: t for t in SUPPORTED.values()}
# Scale of d (and dmin): Q4_K's value is d·sc·q - dmin·m with 6-bit sc, m and 4-bit q, Q6_K's d·sc·(q - 32)
# with an 8-bit signed sc: these keep |w| below about 0.05.
SCALE = {"Q4_K": 5e-5, "Q6_K": 1e-5}


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v and ffn_down get Q6_K in Q4_K_M."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def q4_k_m_type(canonical: str, n_layers: int) -> str:
    if canonical.endswith("norm.weight"):
        return "F32"
    if canonical == "output.weight":
        return "Q6_K"
    if canonical.endswith(("attention.wv.weight", "feed_forward.w2.weight")):
        return "Q6_K" if use_more_bits(int(canonical.split(".")[1]), n_layers) else "Q4_K"
    return "Q4_K"


def random_rows(type_name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """[rows, row_bytes] uint8 of type `type_name`: random bits, scales as above (F32: ones)."""
    t = BY_NAME[type_name]
    if type_name == "F32":
        return np.ones(shape, np.float32).view(np.uint8).reshape(int(np.prod(shape[:-1])), -1)
    rows = int(np.prod(shape[:-1]))
    raw = rng.integers(0, 256, (rows, t.row_bytes(shape[-1])), dtype=np.uint8)
    blocks = raw.view(t.block)
    for field in ("d", "dmin"):
        if field in t.block.names:
            blocks[field] = (rng.random(blocks.shape, np.float32) * SCALE[type_name]).astype(np.float16)
    return raw


def write(config: ModelConfig, path: Path, seed: int) -> None:
    shapes = expected_shapes(config)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(f"random Llama 3 shape, Q4_K_M types (tools/make_random_gguf.py, seed {seed})")
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.dim)
    w.add_block_count(config.n_layers)
    w.add_feed_forward_length(config.ffn_dim)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    tokens = [f"<placeholder{i}>" for i in range(config.vocab_size)]
    for i, text in LLAMA3_SPECIAL_AT.items():
        tokens[i] = text
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_bos_token_id(128000)
    w.add_eos_token_id(128001)
    plan = {}
    if config.rope_scaling is not None:
        plan["rope_freqs.weight"] = ("F32", llama3_rope_factors(config.head_dim, config.rope_theta,
                                                                config.rope_scaling))
    for canonical, shape in shapes.items():
        if canonical == "output.weight" and config.tie_embeddings:
            continue
        plan[gguf_name(canonical)] = (q4_k_m_type(canonical, config.n_layers), shape)
    for name, (type_name, shape) in plan.items():
        if isinstance(shape, np.ndarray):
            w.add_tensor_info(name, shape.shape, shape.dtype, shape.nbytes)
        else:
            t = BY_NAME[type_name]
            nbytes = int(np.prod(shape[:-1])) * t.row_bytes(shape[-1])
            w.add_tensor_info(name, (*shape[:-1], t.row_bytes(shape[-1])), np.dtype(np.uint8), nbytes,
                              raw_dtype=gguf.GGMLQuantizationType(t.id))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, (type_name, shape) in plan.items():
        w.write_tensor_data(shape if isinstance(shape, np.ndarray) else random_rows(type_name, shape, rng))
    w.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shape", nargs="?", choices=sorted(SHAPES), default="llama3.1-8b")
    p.add_argument("-o", "--output", type=Path)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    path = args.output or REPO / "weights" / f"random-{args.shape}.Q4_K_M.gguf"
    tmp = path.with_name(path.name + ".partial")
    write(SHAPES[args.shape], tmp, args.seed)
    tmp.replace(path)
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("make_random_gguf", main))
