#!/usr/bin/env python3
"""Write tests/fixtures/checkpoints/: one tiny random Llama 3 checkpoint in every format it ships in.

    python tools/make_checkpoint_fixtures.py    (`make fixtures` runs it; needs `make tools`: torch, llama-models, gguf)

The checkpoint (D=32, 2 layers, 4 heads / 2 KV heads, F=64, V=128, untied, "llama3" rope scaling
factor 8, bf16 weights drawn from a fixed seed) is written as
    hf/             Hugging Face folder, one model.safetensors
    hf_sharded/     Hugging Face folder, 2 shards + model.safetensors.index.json
    meta/           Meta folder, params.json + consolidated.00.pth (torch.save)
    meta_2shards/   Meta folder split for model parallelism 2 by llama-models' own `reshard_mp`
    gguf_f32.gguf   GGUF, every tensor F32, tokenizer pre "llama-bpe" (GGUFWriter)
    gguf_q8_0.gguf  GGUF, matrices Q8_0 (norms F32, as llama.cpp keeps them), tokenizer pre "smollm"
plus pth_cases.pth / pth_cases.safetensors: torch tensors with the layouts a .pth can hold (bf16,
f16, f32, transposed, offset and shared storages, a Parameter, empty and 0-d) and their values.

The .pth files are written by torch and split by Meta's code, so the torch-free reader and the
merge rules of llama3_np are checked against the real thing, not against themselves.
"""

from __future__ import annotations

import collections
import json
import shutil
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

from tool_support import REPO, run_tool  # first: it makes this checkout's llama3_np importable
import gguf

from llama3_np.formats.gguf_import import gguf_name, llama3_rope_factors, ROPE_FREQS
from llama3_np.formats.checkpoint import expected_shapes, save_hf_checkpoint
from llama3_np.config import ModelConfig, from_meta_params
from llama3_np.formats.safetensors_file import write_safetensors

OUT = REPO / "tests" / "fixtures" / "checkpoints"
SEED = 20240723  # Llama 3.1 release day

PARAMS = {  # Meta params.json of the fixture model
    "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128,
    "multiple_of": 32, "ffn_dim_multiplier": 0.75, "norm_eps": 1e-05, "rope_theta": 500000.0,
    "use_scaled_rope": True,
}


def fixture_config() -> ModelConfig:
    config = from_meta_params(PARAMS)
    assert (config.ffn_dim, config.head_dim, config.rope_scaling.factor) == (64, 8, 8.0), config
    return config


def fixture_weights(config: ModelConfig) -> dict[str, np.ndarray]:
    """Canonical weights (Meta names and layout) in bf16: matrices ~ N(0, 1/D), norms ~ 1."""
    rng = np.random.default_rng(SEED)
    weights = {}
    for name, shape in expected_shapes(config).items():
        values = 1 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else \
            rng.standard_normal(shape) / np.sqrt(shape[1])
        weights[name] = values.astype(ml_dtypes.bfloat16)
    return weights


# torch and llama-models are imported where they are used, so the tests can write GGUF files with
# `write_gguf` (they have gguf but never torch).

def to_torch(a: np.ndarray):
    import torch

    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def write_meta(folder: Path, weights: dict[str, np.ndarray], shards: int):
    import torch
    from llama_models.checkpoint import reshard_mp
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(PARAMS, indent=2) + "\n")
    full = collections.OrderedDict((name, to_torch(w)) for name, w in weights.items())
    for rank in range(shards):
        state = full if shards == 1 else reshard_mp([full], size=shards, rank=rank)
        # Each saved tensor gets its own storage, as in Meta's files (a view would save its base).
        state = collections.OrderedDict((name, state[name].clone()) for name in full)
        torch.save(state, folder / f"consolidated.{rank:02d}.pth")
    if shards > 1:  # Meta's own merge of the shards gives back the checkpoint, bit for bit
        parts = [torch.load(folder / f"consolidated.{r:02d}.pth", weights_only=True) for r in range(shards)]
        merged = reshard_mp(parts, size=1, rank=0)
        assert all(torch.equal(merged[n].view(torch.int16), full[n].view(torch.int16)) for n in full)


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order (byte-level BPE's base vocabulary)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


# Bytes 0-111 only (a full byte-level vocabulary would double the fixture): enough for the
# importer to write a real tokenizer.json, not to encode any text.
BYTES = 112
MERGES = ["h e", "i n", "a n", "Ġ a", "Ġ c", "a d", "Ġa n", "e d"]
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
            "<|reserved_special_token_2|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                 "{{ m['content'] }}<|eot_id|>{% endfor %}")


def write_gguf(path: Path, config: ModelConfig, weights: dict[str, np.ndarray], matrices, pre: str,
               arch: str = "llama", rope_freqs: np.ndarray | None = None, specials: list[str] = SPECIALS,
               eos: str = "<|eot_id|>", add_bos: bool | None = True, n_bytes: int = BYTES,
               merges: list[str] = MERGES):
    """A llama.cpp-style GGUF of canonical weights (rope_freqs: override llama.cpp's scaling tensor;
    add_bos None: no tokenizer.ggml.add_bos_token key, False/True: the key, set only for llama-bpe;
    n_bytes: the vocabulary's first byte tokens, 256 for one that encodes any text)."""
    tokens = byte_level_alphabet()[:n_bytes] + [m.replace(" ", "") for m in merges] + specials
    assert len(tokens) == config.vocab_size
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(config.n_layers)
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.dim)
    w.add_feed_forward_length(config.ffn_dim)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_rope_dimension_count(config.head_dim)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - len(specials)) + [gguf.TokenType.CONTROL] * len(specials))
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|begin_of_text|>"))
    w.add_eos_token_id(tokens.index(eos))
    if add_bos is not None:
        w.add_add_bos_token(add_bos and pre == "llama-bpe")
    w.add_chat_template(CHAT_TEMPLATE)
    # GGUF keeps q/k in Meta's rope order, as llama.cpp's converter writes them.
    for name, value in weights.items():
        x = value.astype(np.float32)
        if x.ndim == 2 and matrices != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(x, matrices), raw_dtype=matrices)
        else:
            w.add_tensor(gguf_name(name), x)
    if config.rope_scaling is not None:
        w.add_tensor(ROPE_FREQS, llama3_rope_factors(config.head_dim, config.rope_theta, config.rope_scaling)
                     if rope_freqs is None else rope_freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_pth_cases(out: Path):
    import torch
    g = torch.Generator().manual_seed(SEED)
    base = torch.randn(10, generator=g)
    shared = torch.randn(6, generator=g, dtype=torch.float32).to(torch.bfloat16)
    cases = collections.OrderedDict([
        ("bf16", torch.randn(2, 3, generator=g).to(torch.bfloat16)),
        ("f16", torch.randn(4, generator=g).to(torch.float16)),
        ("f32_transposed", torch.randn(2, 3, generator=g).t()),
        ("f32_offset", base[3:7]),
        ("shared_head", shared[:2]),
        ("shared_tail", shared[2:].view(2, 2)),
        ("parameter", torch.nn.Parameter(torch.randn(3, 2, generator=g).to(torch.bfloat16))),
        ("empty", torch.zeros(0, 4)),
        ("scalar", torch.tensor(2.5)),
    ])
    assert not cases["f32_transposed"].is_contiguous() and cases["f32_offset"].storage_offset() == 3
    torch.save(cases, out / "pth_cases.pth")
    write_safetensors(out / "pth_cases.safetensors", {k: to_numpy(v) for k, v in cases.items()})


def main() -> int:
    config = fixture_config()
    weights = fixture_weights(config)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    save_hf_checkpoint(OUT / "hf", config, weights)
    save_hf_checkpoint(OUT / "hf_sharded", config, weights, shards=2)
    write_meta(OUT / "meta", weights, shards=1)
    write_meta(OUT / "meta_2shards", weights, shards=2)
    write_gguf(OUT / "gguf_f32.gguf", config, weights, gguf.GGMLQuantizationType.F32, "llama-bpe")
    write_gguf(OUT / "gguf_q8_0.gguf", config, weights, gguf.GGMLQuantizationType.Q8_0, "smollm")
    write_pth_cases(OUT)
    (OUT / "README.md").write_text(
        "# Checkpoint format fixtures\n\nMade by `python tools/make_checkpoint_fixtures.py` (`make fixtures` runs it, "
        "after `make tools`);\nsee that script for what each file is.\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT.relative_to(REPO)}: {total / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("make_checkpoint_fixtures", main))
