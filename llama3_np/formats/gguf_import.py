"""Import a Llama-architecture GGUF file (llama.cpp's format) into a Hugging Face checkpoint folder.

    llama3-np import-gguf IN.gguf OUT_DIR [--force]
    llama3-np generate -m IN.gguf ...     (imported once into the cache, see `assets`)

OUT_DIR then holds what both llama3_np and Hugging Face `transformers` load:
    config.json             LlamaForCausalLM config from the GGUF metadata
    model.safetensors       every tensor dequantized (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, ...)
                            and stored as bf16, under Hugging Face names and rope layout
    tokenizer.json          the byte-level BPE vocabulary, merges and special tokens the GGUF carries
    tokenizer_config.json   bos/eos tokens, add_bos_token, chat template
    generation_config.json  the ids that end a generation: the metadata's eos/eot/eom ids and the
                            end-of-generation tokens of the vocabulary (as llama.cpp finds them)
    llama3_np_import.json   source file name and sha256, tensor types, gguf package version

GGUF q/k rows are already in Meta's interleaved rope order (llama.cpp's converter un-permutes
Hugging Face checkpoints); this tool permutes them back to Hugging Face order for the folder, and
llama3_np's loader un-permutes them again. GGUF lists dimensions innermost first (ne0 = columns),
the reverse of the NumPy shape.

Needs the `gguf` package (the `gguf` extra), imported only when a GGUF file is read: without it,
`require_gguf` says how to install it, and the rest of llama3_np runs as before.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .checkpoint import expected_shapes, save_hf_checkpoint
from ..dtypes import bfloat16
from ..config import (LLAMA3_ORIGINAL_CONTEXT, META_HIGH_FREQ_FACTOR, META_LOW_FREQ_FACTOR,
                      ModelConfig, RopeScaling)
from ..errors import Llama3Error
from ..files import atomic_folder, write_text
from ..text.tokenizer import END_OF_GENERATION, LLAMA3_PATTERN, end_of_generation_ids

IMPORT_RECORD = "llama3_np_import.json"
# Written into the import record; a cached import made by another version is imported again.
# Raise it whenever the folder this module writes changes.
IMPORTER_VERSION = 1


INSTALL_GGUF = "pip install 'llama3_np[gguf]'"


def require_gguf():
    """The `gguf` package; a Llama3Error saying how to install it when it is missing."""
    try:
        import gguf
    except ImportError:
        raise Llama3Error(f"reading a GGUF file needs the gguf package: {INSTALL_GGUF}") from None
    return gguf

# GGUF tensor names <-> canonical (Meta) names.
GGUF_GLOBAL_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
GGUF_LAYER_NAMES = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
    "attn_output": "attention.wo", "attn_norm": "attention_norm",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "ffn_norm": "ffn_norm",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
ROPE_FREQS = "rope_freqs.weight"


def canonical_name(name: str) -> str | None:
    """Canonical name of a GGUF weight name, None if it is not one."""
    if name.endswith(".weight") and name[: -len(".weight")] in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[name[: -len(".weight")]] + ".weight"
    m = _BLOCK_RE.fullmatch(name)
    if m and m.group(2) in GGUF_LAYER_NAMES:
        return f"layers.{int(m.group(1))}.{GGUF_LAYER_NAMES[m.group(2)]}.weight"
    return None


def gguf_name(canonical: str) -> str:
    """GGUF name of a canonical weight name (inverse of `canonical_name`)."""
    base = canonical[: -len(".weight")]
    for g, c in GGUF_GLOBAL_NAMES.items():
        if base == c:
            return g + ".weight"
    _, layer, kind = base.split(".", 2)
    return f"blk.{layer}.{next(g for g, c in GGUF_LAYER_NAMES.items() if c == kind)}.weight"


def llama3_rope_factors(head_dim: int, theta: float, s: RopeScaling) -> np.ndarray:  # -> [Dh/2]
    """llama.cpp's `rope_freqs` tensor: how much "llama3" scaling divides each rope frequency.

    1 for wavelengths below original_context / high_freq_factor, `factor` above
    original_context / low_freq_factor, and a smooth blend in between (llama-models' apply_scaling).
    """
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = (s.original_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = 1 / ((1 - smooth) / s.factor + smooth)
    factors = np.where(wavelen < s.original_context / s.high_freq_factor, 1.0,
                       np.where(wavelen > s.original_context / s.low_freq_factor, s.factor, blended))
    return factors.astype(np.float32)


def _rope_scaling_from_factors(path: Path, factors: np.ndarray, head_dim: int, theta: float) -> RopeScaling:
    """The "llama3" scaling a `rope_freqs` tensor encodes, checked by recomputing the tensor.

    The factor is the largest entry; llama.cpp's converter always uses Meta's low/high frequency
    factors and original context, so those are taken as given and the recomputation proves them.
    """
    scaling = RopeScaling(float(factors.max()), META_LOW_FREQ_FACTOR, META_HIGH_FREQ_FACTOR,
                          LLAMA3_ORIGINAL_CONTEXT)
    expected = llama3_rope_factors(head_dim, theta, scaling)
    if factors.shape != expected.shape or not np.allclose(factors, expected, rtol=1e-6, atol=0):
        raise Llama3Error(f"{path}: tensor {ROPE_FREQS!r} is not Llama 3 rope scaling with Meta's constants "
                          f"(factor {scaling.factor}, low {scaling.low_freq_factor}, high "
                          f"{scaling.high_freq_factor}, original context {scaling.original_context})")
    return scaling


def _f32(x) -> float:
    """A float32 metadata value as the short decimal it was written from (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


@dataclass
class GGUFModel:
    config: ModelConfig
    # Canonical names, Meta layout, dequantized and rounded to bf16 (as the folder stores them) one
    # tensor at a time, so the import needs 2 bytes per parameter, not 4.
    weights: dict[str, np.ndarray]
    tensor_types: dict[str, int]  # GGML type name -> number of tensors
    fields: dict  # the metadata values used


class _Fields:
    def __init__(self, path: Path, reader):  # a gguf.GGUFReader
        self.path, self.reader = path, reader

    def get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def need(self, key: str):
        value = self.get(key)
        if value is None:
            raise Llama3Error(f"{self.path}: metadata key {key!r} is missing; is this a llama.cpp GGUF file?")
        return value


def read_tensor(path: Path, t) -> np.ndarray:
    """One GGUF tensor dequantized to float32, in NumPy (row-major) shape."""
    shape = tuple(int(d) for d in reversed(t.shape))  # GGUF: ne0 (contiguous) first
    try:
        values = require_gguf().quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise Llama3Error(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which the gguf package "
                          f"{metadata.version('gguf')} cannot dequantize") from None
    if values.size != int(np.prod(shape)):
        raise Llama3Error(f"{path}: tensor {t.name!r} holds {values.size} values for shape {shape}; "
                          "the file is corrupted")
    return np.array(values.reshape(shape), np.float32)


def read_gguf(path, progress: Optional[Callable[[int, int], None]] = None) -> GGUFModel:
    """Config and canonical bf16 weights of a Llama-architecture GGUF file; `progress(done,
    total)` is called as each tensor is read."""
    gguf = require_gguf()
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except FileNotFoundError:
        raise Llama3Error(f"{path}: no such file") from None
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise Llama3Error(f"{path}: not a readable GGUF file ({e}); download it again") from None
    f = _Fields(path, reader)
    arch = f.need("general.architecture")
    if arch != "llama":
        raise Llama3Error(f"{path}: general.architecture is {arch!r}; llama3_np imports 'llama' models only")
    scaling_type = f.get("llama.rope.scaling.type", "none")
    if scaling_type != "none":
        raise Llama3Error(f"{path}: rope scaling type {scaling_type!r} is not Llama 3's")
    dim, n_heads = int(f.need("llama.embedding_length")), int(f.need("llama.attention.head_count"))
    head_dim = int(f.get("llama.attention.key_length", dim // n_heads))
    rope_dims = int(f.get("llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim or int(f.get("llama.attention.value_length", head_dim)) != head_dim:
        raise Llama3Error(f"{path}: rope covers {rope_dims} of {head_dim} head dimensions; Llama 3 rotates all")
    tokens = f.need("tokenizer.ggml.tokens")
    vocab_size = int(f.get("llama.vocab_size", len(tokens)))
    if vocab_size != len(tokens):
        raise Llama3Error(f"{path}: llama.vocab_size is {vocab_size} but the tokenizer has {len(tokens)} tokens")
    theta = _f32(f.get("llama.rope.freq_base", 10000.0))

    tensors = {t.name: t for t in reader.tensors}
    scaling = None
    if ROPE_FREQS in tensors:
        scaling = _rope_scaling_from_factors(path, read_tensor(path, tensors.pop(ROPE_FREQS)), head_dim, theta)
    config = ModelConfig(
        dim=dim, n_layers=int(f.need("llama.block_count")), n_heads=n_heads,
        n_kv_heads=int(f.get("llama.attention.head_count_kv", n_heads)), head_dim=head_dim,
        ffn_dim=int(f.need("llama.feed_forward_length")), vocab_size=vocab_size,
        norm_eps=_f32(f.need("llama.attention.layer_norm_rms_epsilon")), rope_theta=theta,
        rope_scaling=scaling, max_seq_len=int(f.need("llama.context_length")),
        tie_embeddings="output.weight" not in tensors,
    )
    shapes = expected_shapes(config)
    weights = {}
    for done, (name, t) in enumerate(tensors.items(), 1):
        canonical = canonical_name(name)
        if canonical not in shapes:
            raise Llama3Error(f"{path}: unexpected tensor {name!r}; it is not part of a "
                              f"{config.n_layers}-layer Llama 3 model")
        weights[canonical] = read_tensor(path, t).astype(bfloat16())
        if weights[canonical].shape != shapes[canonical]:
            raise Llama3Error(f"{path}: tensor {name!r} ({canonical}) has shape {weights[canonical].shape}, "
                              f"but the metadata implies {shapes[canonical]}")
        if progress is not None:
            progress(done, len(tensors))
    for canonical in shapes:
        if canonical not in weights and not (canonical == "output.weight" and config.tie_embeddings):
            raise Llama3Error(f"{path}: tensor {gguf_name(canonical)!r} is missing")
    if config.tie_embeddings:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return GGUFModel(config, weights, dict(sorted(types.items())), f)


# --- tokenizer -----------------------------------------------------------------------------------

# Meta's Llama 3 pre-tokenizer regex (LLAMA3_PATTERN), as Hugging Face's Llama 3 tokenizer.json places it.
_LLAMA3_PRE = ({"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}, True)

# tokenizer.ggml.pre -> (Hugging Face pre_tokenizer, BPE ignore_merges) as Hugging Face writes them
# for that model family. llama.cpp's Llama 3 tokenizer (like tiktoken) takes a whole pre-token that
# is in the vocabulary without merging it: ignore_merges. Every name llama.cpp reads as its Llama 3
# pre-tokenizer (LLAMA_VOCAB_PRE_TYPE_LLAMA3 in src/llama-vocab.cpp) is accepted.
LLAMA3_PRE_NAMES = ("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                    "jina-v5-nano")
PRE_TOKENIZERS = {
    "smollm": ({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}, False),
    **{name: _LLAMA3_PRE for name in LLAMA3_PRE_NAMES},
}

# Whether llama.cpp adds BOS when the GGUF has no tokenizer.ggml.add_bos_token key: yes for its
# Llama 3 pre-tokenizer, no for the other byte-level BPE ones (the key, when present, decides).
ADD_BOS_BY_DEFAULT = frozenset(LLAMA3_PRE_NAMES)


def tokenizer_files(path: Path, f: _Fields, context_length: int) -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) objects from the GGUF tokenizer metadata."""
    model = f.need("tokenizer.ggml.model")
    if model != "gpt2":
        raise Llama3Error(f"{path}: tokenizer.ggml.model is {model!r}; Llama 3 uses byte-level BPE ('gpt2')")
    pre = f.need("tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        raise Llama3Error(f"{path}: tokenizer.ggml.pre is {pre!r}; llama3_np knows smollm and Llama 3's "
                          f"({', '.join(LLAMA3_PRE_NAMES)}) (add its Hugging Face pre-tokenizer here)")
    tokens = f.need("tokenizer.ggml.tokens")
    TokenType = require_gguf().TokenType
    types = f.get("tokenizer.ggml.token_type", [int(TokenType.NORMAL)] * len(tokens))
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise Llama3Error(f"{path}: tokenizer.ggml.tokens has duplicate tokens; the file is corrupted")
    merges = [m.split(" ") for m in f.get("tokenizer.ggml.merges", [])]
    if any(len(m) != 2 for m in merges):
        raise Llama3Error(f"{path}: a tokenizer.ggml.merges entry is not two tokens separated by a space")
    # llama.cpp makes an end-of-generation token a control token whatever type the file gives it.
    control = [types[i] == TokenType.CONTROL or tokens[i] in END_OF_GENERATION for i in range(len(tokens))]
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": control[i]}
             for i in range(len(tokens)) if control[i] or types[i] == TokenType.USER_DEFINED]

    def special(key):
        i = f.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[int(i)]

    bos, eos = special("bos"), special("eos")
    add_bos = bool(f.get("tokenizer.ggml.add_bos_token", pre in ADD_BOS_BY_DEFAULT))
    add_eos = bool(f.get("tokenizer.ggml.add_eos_token", False))
    byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    post = byte_level
    if add_bos or add_eos:
        ends = [t for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        if None in ends:
            raise Llama3Error(f"{path}: the tokenizer adds bos/eos tokens but does not say which")

        def sequence(name, type_id):  # [bos] name [eos], as Hugging Face's Llama 3 template reads
            return ([{"SpecialToken": {"id": bos, "type_id": type_id}}] if add_bos else []) \
                + [{"Sequence": {"id": name, "type_id": type_id}}] \
                + ([{"SpecialToken": {"id": eos, "type_id": type_id}}] if add_eos else [])

        single, pair = sequence("A", 0), sequence("A", 0) + sequence("B", 1)
        template = {"type": "TemplateProcessing", "single": single, "pair": pair,
                    "special_tokens": {t: {"id": t, "ids": [vocab[t]], "tokens": [t]} for t in ends}}
        post = {"type": "Sequence", "processors": [byte_level, template]}
    pre_tokenizer, ignore_merges = PRE_TOKENIZERS[pre]
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": pre_tokenizer, "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges},
    }
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
                        "add_bos_token": add_bos, "add_eos_token": add_eos, "model_max_length": context_length,
                        "clean_up_tokenization_spaces": False}
    for key in ("unknown", "padding"):
        if special(key) is not None:
            tokenizer_config[{"unknown": "unk_token", "padding": "pad_token"}[key]] = special(key)
    template = f.get("tokenizer.chat_template")
    if template is not None:
        tokenizer_config["chat_template"] = template
    return tokenizer_json, tokenizer_config


# --- the folder ----------------------------------------------------------------------------------

def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, obj):
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_folder(gguf_path: Path, out_dir: Path, sha256: str | None = None,
                 progress: Optional[Callable[[int, int], None]] = None):
    """Import `gguf_path` into the (new or empty) folder `out_dir`."""
    model = read_gguf(gguf_path, progress)
    f = model.fields
    tokenizer_json, tokenizer_config = tokenizer_files(gguf_path, f, model.config.max_seq_len)
    ids = {key: int(f.get(f"tokenizer.ggml.{key}_token_id")) for key in ("bos", "eos", "eot", "eom")
           if f.get(f"tokenizer.ggml.{key}_token_id") is not None}
    # Instruct models end a turn with eot (<|eot_id|>) or eom as well as eos: Hugging Face lists all.
    eos = list(dict.fromkeys(ids[k] for k in ("eos", "eot", "eom") if k in ids))
    extra = {"bos_token_id": ids.get("bos"), "eos_token_id": eos[0] if len(eos) == 1 else eos or None}
    save_hf_checkpoint(out_dir, model.config, model.weights,
                       extra_config={k: v for k, v in extra.items() if v is not None})
    _write_json(out_dir / "generation_config.json", {
        "bos_token_id": ids.get("bos"), "eos_token_id": end_of_generation_ids(  # found as llama.cpp's end-of-generation set finds them
            {token: i for i, token in enumerate(f.need("tokenizer.ggml.tokens"))}, eos)})
    _write_json(out_dir / "tokenizer.json", tokenizer_json)
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(out_dir / IMPORT_RECORD, {
        "source": gguf_path.name, "sha256": sha256 or sha256_of(gguf_path),
        "tensor_types": model.tensor_types, "gguf_package": metadata.version("gguf"),
        "general.name": f.get("general.name"), "tokenizer.ggml.pre": f.get("tokenizer.ggml.pre"),
        "stored_as": "bf16, Hugging Face names and rope layout", "importer": IMPORTER_VERSION,
    })


def is_nonempty_folder(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def import_gguf(gguf_path, out_dir, force: bool = False, sha256: str | None = None,
                progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """Import into `out_dir` atomically: it appears complete or not at all (`files.atomic_folder`).

    progress: called with (done, total) as the tensors are read. Raises Llama3Error for a file
    that is not a Llama 3 GGUF, WriteError for a folder that cannot be written."""
    require_gguf()
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise Llama3Error(f"{out_dir}: is a file; name a folder to import into")
    if is_nonempty_folder(out_dir) and not force:
        raise Llama3Error(f"{out_dir}: exists and is not empty; name a new folder (or replace it: force=True)")
    with atomic_folder(out_dir, replace=True) as tmp:
        write_folder(gguf_path, tmp, sha256, progress)
    return out_dir
