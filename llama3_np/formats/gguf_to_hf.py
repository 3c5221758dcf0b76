"""`llama3-np import-gguf FILE OUT_DIR`: a GGUF file written as a Hugging Face checkpoint folder of its
exact values, which llama3_np and Hugging Face `transformers` load (llama3_np reads the file itself
without it: `gguf_import.scan_gguf`).

OUT_DIR holds:
    config.json             LlamaForCausalLM config from the GGUF metadata
    model.safetensors       every tensor with its exact values (`ggml_blocks`), under Hugging Face
                            names and rope layout: bf16 where the values are all bfloat16 numbers
                            (a BF16 tensor), float32 otherwise (F32, F16 and every quantized type)
    tokenizer.json          the byte-level BPE vocabulary, merges and special tokens the GGUF carries
    tokenizer_config.json   bos/eos tokens, add_bos_token, chat template
    generation_config.json  the ids that end a generation: the metadata's eos/eot/eom ids and the
                            end-of-generation tokens of the vocabulary (as llama.cpp finds them)
    llama3_np_import.json   source file name and sha256, tensor types

GGUF q/k rows are in Meta's interleaved rope order (llama.cpp's converter un-permutes Hugging Face
checkpoints); the folder permutes them back to Hugging Face order, and llama3_np's loader
un-permutes them again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from ..errors import Llama3Error
from ..files import atomic_folder, write_text
from .checkpoint import save_hf_checkpoint
from .gguf_file import GGUFFile
from .gguf_import import (IMPORT_RECORD, _eos_ids, _Fields, exact_dtype, gguf_config, sha256_of, tensor_types,
                          tokenizer_files)


def _write_json(path: Path, obj):
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_folder(gguf_path: Path, out_dir: Path, sha256: str | None = None,
                 progress: Optional[Callable[[int, int], None]] = None):
    """Import `gguf_path` into the (new or empty) folder `out_dir`: exact values, one tensor at a time
    in memory beside what is written (`save_hf_checkpoint` stores each in its own dtype)."""
    file = GGUFFile(gguf_path)
    config, tensors = gguf_config(gguf_path, file)
    f = _Fields(gguf_path, file)
    tokenizer_json, tokenizer_config = tokenizer_files(gguf_path, f, config.max_seq_len)
    ids, stop_ids = _eos_ids(f)
    eos = [i for i in stop_ids if i in (ids.get("eos"), ids.get("eot"), ids.get("eom"))]
    extra = {"bos_token_id": ids.get("bos"), "eos_token_id": eos[0] if len(eos) == 1 else eos or None}
    weights = {}
    for done, (canonical, t) in enumerate(tensors.items(), 1):
        values = t.values()
        weights[canonical] = values.astype(exact_dtype(values), copy=False)
        if progress is not None:
            progress(done, len(tensors))
    if config.tie_embeddings:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    save_hf_checkpoint(out_dir, config, weights, extra_config={k: v for k, v in extra.items() if v is not None},
                       keep_dtype=True)
    _write_json(out_dir / "generation_config.json", {"bos_token_id": ids.get("bos"), "eos_token_id": stop_ids})
    _write_json(out_dir / "tokenizer.json", tokenizer_json)
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(out_dir / IMPORT_RECORD, {
        "source": gguf_path.name, "sha256": sha256 or sha256_of(gguf_path), "tensor_types": tensor_types(file),
        "general.name": f.get("general.name"), "tokenizer.ggml.pre": f.get("tokenizer.ggml.pre"),
        "stored_as": "exact values (bf16 where all are bfloat16 numbers, else float32), Hugging Face names "
                     "and rope layout",
    })


def is_nonempty_folder(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def import_gguf(gguf_path, out_dir, force: bool = False, sha256: str | None = None,
                progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """Import into `out_dir` atomically: it appears complete or not at all (`files.atomic_folder`).

    progress: called with (done, total) as the tensors are read. Raises Llama3Error for a file
    that is not a Llama 3 GGUF, WriteError for a folder that cannot be written."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise Llama3Error(f"{out_dir}: is a file; name a folder to import into")
    if is_nonempty_folder(out_dir) and not force:
        raise Llama3Error(f"{out_dir}: exists and is not empty; name a new folder (or replace it: force=True)")
    with atomic_folder(out_dir, replace=True) as tmp:
        write_folder(gguf_path, tmp, sha256, progress)
    return out_dir
