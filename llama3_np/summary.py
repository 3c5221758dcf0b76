"""What `llama3-np inspect` reports of a checkpoint folder or GGUF file, checked, without reading its weights.

Reads the config and the tensor headers only (the same validation `load_checkpoint` does first),
so it is instant even for a 405B checkpoint: the format and its files, the config, the parameter
count, the stored bytes per dtype, the memory each residency needs, the tokenizer, its chat format
and the tokens that end generation, and where an imported folder came from. `summarize` gives the
facts as JSON-able values, `summary_text` the text the command prints.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np

from .assets import import_record
from .config import ROPE_FACTOR_SOURCES
from .errors import Llama3Error
from .formats.checkpoint import CheckpointIndex
from .products import conversion_buffer_bytes
from .text.tokenizer import TOKENIZER_FILES, find_tokenizer_file

FORMAT_NAMES = {"hf": "Hugging Face", "meta": "Meta", "gguf": "GGUF"}


def summarize(index: CheckpointIndex) -> dict:
    """The facts `inspect` prints, as plain JSON-able values."""
    params = {name: int(np.prod(plan.shape)) for name, plan in index.plans.items()}  # tied: counted once
    stored = Counter()
    gguf = {name: plan.pieces[0].gguf for name, plan in index.plans.items() if plan.pieces[0].gguf is not None}
    for name, plan in index.plans.items():
        if name in gguf:  # a GGUF tensor: its ggml type and the bytes of its blocks
            stored[gguf[name].type.name] += gguf[name].nbytes
        else:
            stored[plan.dtype.name] += params[name] * plan.dtype.itemsize
    # bfloat16 residency converts each matrix to float32 a block of rows at a time, a block per
    # thread (products.linear): the float32 weight memory it needs beyond the mapped files.
    working = conversion_buffer_bytes(plan.shape for plan in index.plans.values() if len(plan.shape) == 2)
    # A GGUF's quantized and F16 tensors are rarely bfloat16 numbers (only loading them tells):
    # counted as the float32 they then stay, so for a GGUF this is an upper bound.
    bf16_resident = sum(params[name] * index.plans[name].dtype.itemsize if name not in gguf else
                        gguf[name].nbytes if gguf[name].type.name in ("F32", "BF16") else 4 * params[name]
                        for name in params)
    memory = {"float32": 4 * sum(params.values()), "bfloat16": bf16_resident + working,
              "bfloat16_mapped": bf16_resident, "bfloat16_working_float32": working}
    if index.format == "gguf":
        memory.update(gguf=sum(stored.values()) + working)
    tokenizer = find_tokenizer_file(index.path) if index.path.is_dir() else None
    config = index.config.to_dict()
    if index.config.rope_scaling is not None:
        config["rope_scaling"]["factor_source"] = index.config.rope_scaling.factor_source
    return {
        "path": str(index.path),
        "format": index.format,
        "files": [str(f.relative_to(index.path)) if index.path.is_dir() else f.name for f in index.files],
        "config": config,
        "parameters": sum(params.values()),
        "stored_bytes": dict(stored),
        "memory_bytes": memory,
        "tokenizer": ("GGUF metadata (tokenizer.ggml.*)" if index.format == "gguf" else
                      None if tokenizer is None else str(tokenizer.relative_to(index.path))),
        "eos_ids": list(index.eos_ids),
        **_tokens(index),
        "source": import_record(index.path) if index.path.is_dir() else None,
        "ignored_tensors": index.ignored,
    }


def _tokens(index: CheckpointIndex) -> dict:
    """The chat format and the tokens that end generation (id -> text), when there is a tokenizer."""
    from .load import chat_template_of, load_tokenizer
    from .text.chat import chat_format_for, describe

    none = {"chat_format": None, "chat_format_source": None, "stop_tokens": {str(i): None for i in index.eos_ids}}
    if index.tokenizer_dir is None:
        return none
    try:
        tok = load_tokenizer(index.tokenizer_dir)
    except Llama3Error as e:  # inspect reports a broken tokenizer rather than stopping at it
        return dict(none, tokenizer_error=str(e))
    try:
        fmt = chat_format_for(tok, template=chat_template_of(index.path))
    except Llama3Error:
        fmt = None
    ids = set(index.eos_ids) | tok.end_of_generation_ids  # as LoadedModel.stop_ids
    return {"chat_format": fmt.name if fmt else None, "chat_format_source": describe(fmt) if fmt else None,
            "stop_tokens": {str(i): tok.decode([i]) for i in sorted(ids)}}


def _source(record: dict | None) -> str:
    if record is None:
        return "as downloaded (not imported by llama3_np)"
    types = ", ".join(f"{name} x{n}" for name, n in record.get("tensor_types", {}).items())
    return (f"GGUF {record.get('source')} (sha256 {str(record.get('sha256'))[:16]}..., tensors {types}), "
            f"dequantized and stored as {record.get('stored_as', 'bf16')}")


def _scaled(n: float, unit: str = "") -> str:
    """1234567 -> '1.2 M' (with unit 'B': '1.2 MB'); decimal prefixes, as model sizes are quoted."""
    for prefix, scale in (("T", 1e12), ("G" if unit else "B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {prefix}{unit}"
    return f"{n:g} {unit}".rstrip()


def _size(n: int) -> str:
    return _scaled(n, "B")


def summary_text(s: dict) -> str:
    """The report `llama3-np inspect` prints, from `summarize`'s facts."""
    c = s["config"]
    rope = c["rope_scaling"]
    scaling = "none" if rope is None else (f"llama3 factor {rope['factor']:g} (low {rope['low_freq_factor']:g}, "
                                           f"high {rope['high_freq_factor']:g}, original context "
                                           f"{rope['original_context']})")
    source = [] if rope is None else [
        f"             rope factor {rope['factor']:g}: {ROPE_FACTOR_SOURCES[rope['factor_source']]}"
        + (" (--rope-factor)" if rope["factor_source"] == "override" else "")]
    m = s["memory_bytes"]
    lines = [
        f"path:        {s['path']}",
        f"format:      {FORMAT_NAMES[s['format']]} ({', '.join(s['files'])})",
        f"config:      dim {c['dim']}, {c['n_layers']} layers, {c['n_heads']} heads / {c['n_kv_heads']} kv heads "
        f"of {c['head_dim']}, ffn {c['ffn_dim']}, vocab {c['vocab_size']}",
        f"             norm_eps {c['norm_eps']:g}, rope_theta {c['rope_theta']:g}, rope scaling {scaling}",
        f"             context {c['max_seq_len']}, tied embeddings {'yes' if c['tie_embeddings'] else 'no'}",
        *source,
        f"parameters:  {s['parameters']:,} ({_scaled(s['parameters'])})",
        "stored:      " + ", ".join(f"{dtype} {_size(n)}" for dtype, n in s["stored_bytes"].items()),
        f"memory:      --dtype float32: {_size(m['float32'])}; --dtype bfloat16: {_size(m['bfloat16'])} "
        + (f"({_size(m['bfloat16_mapped'])} mapped from the files + {_size(m['bfloat16_working_float32'])} "
           "of float32 conversion block)" if "gguf" not in m else
           f"at most ({_size(m['bfloat16_mapped'])} of weights, a quantized tensor held in float32 unless bfloat16 "
           f"holds its values exactly, + {_size(m['bfloat16_working_float32'])} of float32 conversion block); "
           f"--dtype gguf: {_size(m['gguf'])}"),
        f"tokenizer:   {s['tokenizer'] or 'none found (looked for ' + ', '.join(TOKENIZER_FILES) + ')'}",
        *([f"             unreadable: {s['tokenizer_error']}"] if "tokenizer_error" in s else []),
        f"chat format: {s['chat_format_source'] or 'none (plain generation only)'}",
        "stop tokens: " + (", ".join(f"{i} {json.dumps(t, ensure_ascii=False) if t is not None else ''}".rstrip()
                                     for i, t in s["stop_tokens"].items()) or "none"),
        f"source:      {'the GGUF file as it is, read in place' if s['format'] == 'gguf' else _source(s['source'])}",
    ]
    lines += [f"ignored:     {where} ({why})" for where, why in s["ignored_tensors"].items()]
    return "\n".join(lines)
