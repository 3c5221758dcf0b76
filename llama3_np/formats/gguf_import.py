"""A Llama-architecture GGUF file (llama.cpp's format) as a checkpoint, read as it is.

    llama3-np generate -m IN.gguf ...     (read from the file itself, memory-mapped)

`scan_gguf` gives the same `CheckpointIndex` a folder gives: the config from the metadata, one
plan per tensor (canonical names, Meta layout), and the tokenizer from the metadata; no weight
is read until the model loads, and then with the file's exact values (`ggml_blocks`).
`gguf_to_hf` writes the same into a Hugging Face folder on request (`llama3-np import-gguf`).

GGUF q/k rows are already in Meta's interleaved rope order (llama.cpp's converter un-permutes
Hugging Face checkpoints). GGUF lists dimensions innermost first (ne0 = columns), the reverse of
the NumPy shape (`gguf_file`).

Reading a GGUF needs NumPy alone (`gguf_file`, `ggml_blocks`); the `gguf` package is the
reference the tests check them against.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Optional


import numpy as np

from .canonical import CheckpointIndex, StoredTensor, TensorPlan, expected_shapes
from .gguf_file import GGUFFile, GGUFTensor
from ..dtypes import bfloat16
from ..config import (LLAMA3_ORIGINAL_CONTEXT, META_HIGH_FREQ_FACTOR, META_LOW_FREQ_FACTOR,
                      ModelConfig, RopeScaling)
from ..errors import Llama3Error, warn
from ..text.tokenizer import END_OF_GENERATION, LLAMA3_PATTERN, end_of_generation_ids

IMPORT_RECORD = "llama3_np_import.json"

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


class _Fields:
    """The metadata of a GGUF file, with the one error for a key that must be there."""

    def __init__(self, path: Path, file: GGUFFile):
        self.path, self.file = path, file

    def get(self, key: str, default=None):
        return self.file.metadata.get(key, default)

    def need(self, key: str):
        value = self.get(key)
        if value is None:
            raise Llama3Error(f"{self.path}: metadata key {key!r} is missing; is this a llama.cpp GGUF file?")
        return value


def gguf_config(path: Path, file: GGUFFile) -> tuple[ModelConfig, dict[str, GGUFTensor]]:
    """The config a Llama-architecture GGUF's metadata describes, and its tensors under canonical
    names (tied embeddings: no "output.weight"), checked against each other."""
    f = _Fields(path, file)
    arch = f.need("general.architecture")
    if arch != "llama":
        raise Llama3Error(f"{path}: general.architecture is {arch!r}; llama3_np reads 'llama' models only "
                          "(Llama 3 and models of its architecture)")
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

    tensors = dict(file.tensors)
    scaling = None
    if ROPE_FREQS in tensors:
        scaling = _rope_scaling_from_factors(path, tensors.pop(ROPE_FREQS).values(), head_dim, theta)
    config = ModelConfig(
        dim=dim, n_layers=int(f.need("llama.block_count")), n_heads=n_heads,
        n_kv_heads=int(f.get("llama.attention.head_count_kv", n_heads)), head_dim=head_dim,
        ffn_dim=int(f.need("llama.feed_forward_length")), vocab_size=vocab_size,
        norm_eps=_f32(f.need("llama.attention.layer_norm_rms_epsilon")), rope_theta=theta,
        rope_scaling=scaling, max_seq_len=int(f.need("llama.context_length")),
        tie_embeddings="output.weight" not in tensors,
    )
    shapes = expected_shapes(config)
    by_canonical = {}
    for name, t in tensors.items():
        canonical = canonical_name(name)
        if canonical not in shapes:
            raise Llama3Error(f"{path}: unexpected tensor {name!r}; it is not part of a "
                              f"{config.n_layers}-layer Llama 3 model")
        if t.shape != shapes[canonical]:
            raise Llama3Error(f"{path}: tensor {name!r} ({canonical}) has shape {t.shape}, "
                              f"but the metadata implies {shapes[canonical]}")
        by_canonical[canonical] = t
    for canonical in shapes:
        if canonical not in by_canonical and not (canonical == "output.weight" and config.tie_embeddings):
            raise Llama3Error(f"{path}: tensor {gguf_name(canonical)!r} is missing")
    return config, by_canonical


def tensor_types(file: GGUFFile) -> dict[str, int]:
    """GGML type name -> number of tensors of that type."""
    return dict(sorted(Counter(t.type.name for t in file.tensors.values()).items()))


def scan_gguf(path) -> CheckpointIndex:
    """A GGUF file as a checkpoint: config, one plan per canonical tensor (its `StoredTensor.gguf`
    the stored blocks, `read` the exact float32 values), the end-of-generation ids and the
    tokenizer (from the metadata, `gguf_tokenizer`); no tensor data is read.
    Raises Llama3Error for a file that is not a readable Llama-architecture GGUF."""
    path = Path(path)
    file = GGUFFile(path)
    config, tensors = gguf_config(path, file)
    tokenizer_files(path, _Fields(path, file), config.max_seq_len)  # refuses a tokenizer it cannot read
    plans = {canonical: TensorPlan((StoredTensor(path, t.name, np.dtype(np.float32), t.shape, t.values, gguf=t),),
                                   t.shape)
             for canonical, t in tensors.items()}
    return CheckpointIndex(path, "gguf", config, plans, [path], tokenizer_dir=path,
                           eos_ids=tuple(_eos_ids(_Fields(path, file))[1]))


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

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type, gguf-py's TokenType).
NORMAL_TOKEN, CONTROL_TOKEN, USER_DEFINED_TOKEN = 1, 3, 4

# Llama 3's vocabulary: 128,000 byte-level BPE tokens, then its special tokens from 128000 on.
LLAMA3_SPECIAL_AT = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>"}


def pre_tokenizer_name(path: Path, f: _Fields) -> str:
    """tokenizer.ggml.pre; for a GGUF made before llama.cpp recorded it (spring 2024), "llama-bpe"
    when the vocabulary is Llama 3's (its special tokens where Llama 3 has them), with a note."""
    pre = f.get("tokenizer.ggml.pre")
    if pre is not None:
        return pre
    tokens = f.need("tokenizer.ggml.tokens")
    if all(i < len(tokens) and tokens[i] == text for i, text in LLAMA3_SPECIAL_AT.items()):
        warn(f"{path}: no tokenizer.ggml.pre (a GGUF made before llama.cpp recorded it); the vocabulary is "
             "Llama 3's, so its pre-tokenizer (llama-bpe) is used", kind="note")
        return "llama-bpe"
    raise Llama3Error(f"{path}: no tokenizer.ggml.pre and the vocabulary is not Llama 3's, so the pre-tokenizer "
                      "is unknown; convert the model again with a current llama.cpp")


def tokenizer_files(path: Path, f: _Fields, context_length: int) -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) objects from the GGUF tokenizer metadata."""
    model = f.need("tokenizer.ggml.model")
    if model != "gpt2":
        raise Llama3Error(f"{path}: tokenizer.ggml.model is {model!r}; Llama 3 uses byte-level BPE ('gpt2')")
    pre = pre_tokenizer_name(path, f)
    if pre not in PRE_TOKENIZERS:
        raise Llama3Error(f"{path}: tokenizer.ggml.pre is {pre!r}; llama3_np knows smollm and Llama 3's "
                          f"({', '.join(LLAMA3_PRE_NAMES)}) (add its Hugging Face pre-tokenizer here)")
    tokens = f.need("tokenizer.ggml.tokens")
    types = f.get("tokenizer.ggml.token_type", [NORMAL_TOKEN] * len(tokens))
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise Llama3Error(f"{path}: tokenizer.ggml.tokens has duplicate tokens; the file is corrupted")
    merges = [m.split(" ") for m in f.get("tokenizer.ggml.merges", [])]
    if any(len(m) != 2 for m in merges):
        raise Llama3Error(f"{path}: a tokenizer.ggml.merges entry is not two tokens separated by a space")
    # llama.cpp makes an end-of-generation token a control token whatever type the file gives it.
    control = [types[i] == CONTROL_TOKEN or tokens[i] in END_OF_GENERATION for i in range(len(tokens))]
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": control[i]}
             for i in range(len(tokens)) if control[i] or types[i] == USER_DEFINED_TOKEN]

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


def _eos_ids(f: _Fields) -> tuple[dict[str, int], list[int]]:
    """The bos/eos/eot/eom ids the metadata declares, and the ids that end a generation."""
    ids = {key: int(f.get(f"tokenizer.ggml.{key}_token_id")) for key in ("bos", "eos", "eot", "eom")
           if f.get(f"tokenizer.ggml.{key}_token_id") is not None}
    # Instruct models end a turn with eot (<|eot_id|>) or eom as well as eos: Hugging Face lists all.
    eos = list(dict.fromkeys(ids[k] for k in ("eos", "eot", "eom") if k in ids))
    return ids, end_of_generation_ids({token: i for i, token in enumerate(f.need("tokenizer.ggml.tokens"))}, eos)


def tokenizer_objects(path) -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) objects a GGUF file's metadata describes (no tensor
    is read)."""
    path = Path(path)
    file = GGUFFile(path)
    return tokenizer_files(path, _Fields(path, file), int(file.metadata.get("llama.context_length", 0)))


def gguf_tokenizer(path) -> "Tokenizer":
    """The tokenizer a GGUF file's metadata describes (no tensor is read)."""
    from ..text.tokenizer import Tokenizer

    return Tokenizer.from_hf_objects(path, *tokenizer_objects(path))


def exact_dtype(values: np.ndarray) -> np.dtype:
    """bfloat16 when every value is a bfloat16 number (the conversion is exact), else float32."""
    same = np.array_equal(values.astype(bfloat16()).astype(np.float32), values, equal_nan=True)
    return bfloat16() if same else np.dtype(np.float32)
