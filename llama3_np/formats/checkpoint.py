"""Checkpoints: every format Llama 3 weights ship in, into one canonical form (docs/DESIGN.md).

    Hugging Face folder   config.json + model.safetensors, or model-0000N-of-0000M.safetensors
                          with model.safetensors.index.json; q/k rows permuted for rotate-half rope
    Meta folder           params.json + consolidated.00.pth ... consolidated.NN.pth (model-parallel
                          shards), read by `llama3_np.formats.pth` without torch
    GGUF file             one .gguf file (llama.cpp's format), read as it is, memory-mapped
                          (`llama3_np.formats.gguf_import.scan_gguf`); q/k already in Meta order

The canonical form (`Checkpoint.weights`) uses Meta's state-dict names and Meta's interleaved rope
row order for wq/wk, whatever the source. With tied embeddings, `weights["output.weight"] is
weights["tok_embeddings.weight"]`.

Loading happens in two passes. `scan_checkpoint` reads only configs and file headers and checks
them against each other: every expected tensor present, every shape what the config says, no
unknown tensor, dtypes understood. Only then does `load_checkpoint` read data, in one of two
residencies:
- "float32": every tensor converted to float32 once, at load (the fast mode). Each stored tensor is
  mapped, converted and released in turn, so the peak is the float32 copy plus one tensor.
- "bfloat16": tensors stay as stored (bf16 for every released Llama 3 checkpoint), memory-mapped
  from the file wherever the file allows; the model converts them to float32 a block of rows at a
  time (`llama3_np.linear`).
  Nothing is ever rounded: a float32 or float16 file stays float32 or float16. Copies are made only
  where the layout must change: HF q/k (row order) and tensors merged from Meta shards.
  A GGUF's quantized tensors are dequantized to their exact values, kept as bfloat16 where every
  value is a bfloat16 number and as float32 otherwise (with a note saying how many).
- "gguf" (GGUF files only): every tensor stays as the file stores it, memory-mapped: quantized
  matrices as their ggml blocks (`QuantizedWeight`), dequantized a block of rows at a time by
  each product (`llama3_np.products`), float tensors as in "bfloat16".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import ROPE_FACTOR_SOURCES, ModelConfig, from_hf_config, from_meta_params
from ..dtypes import bfloat16, is_bfloat16
from ..errors import Llama3Error, warn
from ..files import make_folder, read_json, write_text
from ..text.tokenizer import find_tokenizer_file
from .canonical import CheckpointIndex, StoredTensor, TensorPlan, expected_shapes, joined_names, row_blocks
from .gguf_file import is_gguf
from .pth import PthFile
from .safetensors_file import SafetensorsFile, write_safetensors

RESIDENCIES = ("float32", "bfloat16", "gguf")
# The weight dtypes read: float32, float16 and bfloat16 (`is_bfloat16`, which needs no ml_dtypes).
FLOAT_DTYPES = (np.dtype("<f4"), np.dtype("<f2"))

# --- names ---------------------------------------------------------------------------------------

# Meta name (per layer after "layers.{i}.") <-> Hugging Face name (after "model.layers.{i}.").
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GLOBAL_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"(model\.)?layers\.(\d+)\.(.+)")


def _rename(name: str, globals_: dict[str, str], layers: dict[str, str], prefix: str) -> Optional[str]:
    if name in globals_:
        return globals_[name]
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(3) in layers and (m.group(1) is not None) == (prefix == "layers."):
        return f"{prefix}{int(m.group(2))}.{layers[m.group(3)]}"
    return None


def hf_name(meta_name: str) -> str:
    """Hugging Face name of a canonical (Meta) tensor name."""
    name = _rename(meta_name, _GLOBAL_NAMES, _LAYER_NAMES, "model.layers.")
    if name is None:
        raise KeyError(meta_name)
    return name


def meta_name(hf: str) -> Optional[str]:
    """Canonical (Meta) name of a Hugging Face tensor name, None if it is not a Llama weight."""
    return _rename(hf, {v: k for k, v in _GLOBAL_NAMES.items()},
                   {v: k for k, v in _LAYER_NAMES.items()}, "layers.")


# Tensors some writers add that the math does not need, and why each may be dropped.
IGNORABLE = {
    # Older transformers saved the rope inverse frequencies as a buffer; rope is computed from
    # the config (rope_theta, rope_scaling), never from this copy.
    re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"): "rope frequencies, recomputed from the config",
    # Llama 2-era Meta checkpoints stored the complex rope table in the same way.
    re.compile(r"rope\.freqs"): "rope frequencies, recomputed from the config",
}


def _ignorable(name: str) -> Optional[str]:
    return next((why for pattern, why in IGNORABLE.items() if pattern.fullmatch(name)), None)


# --- the rope row order of q/k -------------------------------------------------------------------

def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:  # [n_heads*Dh, D] -> [n_heads*Dh, D]
    """Meta interleaved rope rows -> Hugging Face rotate-half rows (transformers' `permute`).

    Within each head, Meta rotates rows (2i, 2i+1) together; Hugging Face rotates rows (i, i + Dh/2).
    So HF row i is Meta row 2i and HF row Dh/2 + i is Meta row 2i + 1.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:  # [n_heads*Dh, D] -> [n_heads*Dh, D]
    """Hugging Face rotate-half rows -> Meta interleaved rope rows (inverse of `permute_qk`)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


# --- the scanned checkpoint ----------------------------------------------------------------------

@dataclass
class Checkpoint:
    """Canonical weights (Meta names and rope layout) and the config they belong to."""

    path: Path
    format: str  # "hf" | "meta" | "gguf"
    config: ModelConfig
    weights: dict[str, np.ndarray]  # (and `QuantizedWeight`s in "gguf" residency)
    dtype: str  # residency: "float32" | "bfloat16" | "gguf"
    tokenizer_dir: Optional[Path] = None  # the folder holding the tokenizer files, if any
    # End-of-sequence ids the checkpoint's own config declares (Hugging Face config.json and
    # generation_config.json); empty for Meta folders, whose tokenizer says it.
    eos_ids: tuple[int, ...] = ()


def _read_json(path: Path):
    return read_json(path, advice="download it again")


def _stored(file, path: Path, name: str) -> StoredTensor:
    return StoredTensor(path, name, file.dtype(name), file.shape(name), lambda: file.tensor(name))


def _check_dtype(t: StoredTensor, what: str):
    if t.dtype not in FLOAT_DTYPES and not is_bfloat16(t.dtype):
        raise Llama3Error(f"{t.file}: tensor {t.name!r} ({what}) is stored as {t.dtype}; "
                          "llama3_np reads float32, float16 and bfloat16 weights")


def _shape_error(t: StoredTensor, canonical: str, expected, source: str) -> Llama3Error:
    return Llama3Error(f"{t.file}: tensor {t.name!r} ({canonical}) has shape {tuple(t.shape)}, but {source} "
                       f"implies {tuple(expected)}; the config does not belong to these weights")


def scan_checkpoint(path, rope_factor: Optional[float] = None) -> CheckpointIndex:
    """Read and cross-check the config and the tensor headers of a checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise Llama3Error(f"{path}: no such file or directory; pass a checkpoint folder "
                          "(with config.json or params.json)")
    if path.is_file():
        if is_gguf(path):
            if rope_factor is not None:
                raise Llama3Error(f"{path}: a rope factor override applies to Meta params.json only; "
                                  "a GGUF file states its rope scaling")
            from .gguf_import import scan_gguf
            return scan_gguf(path)
        raise Llama3Error(f"{path}: is a file; pass the checkpoint folder that holds it "
                          "(with config.json or params.json), or a .gguf file")
    if (path / "config.json").is_file():
        index = _scan_hf(path)
    elif (path / "params.json").is_file():
        index = _scan_meta(path, rope_factor)
    else:
        hint = " (its original/ folder is a Meta checkpoint)" if (path / "original" / "params.json").is_file() else ""
        raise Llama3Error(f"{path}: no config.json (Hugging Face) or params.json (Meta) here{hint}; "
                          "pass a checkpoint folder")
    if rope_factor is not None and index.format != "meta":
        raise Llama3Error(f"{path}: a rope factor override applies to Meta params.json only; "
                          "a Hugging Face config.json states its factor")
    tokenizer = find_tokenizer_file(path)
    index.tokenizer_dir = path if tokenizer is not None else None
    return index


def _eos_ids(path: Path, config_json: dict) -> tuple[int, ...]:
    """eos_token_id of config.json and generation_config.json (an id or a list of ids each)."""
    ids = []
    generation_path = path / "generation_config.json"
    for source, obj in (("config.json", config_json),
                        ("generation_config.json", _read_json(generation_path) if generation_path.is_file() else {})):
        value = obj.get("eos_token_id") if isinstance(obj, dict) else None
        values = value if isinstance(value, list) else [] if value is None else [value]
        if not all(type(v) is int and v >= 0 for v in values):
            raise Llama3Error(f"{path / source}: eos_token_id must be a token id or a list of them, got {value!r}")
        ids += [v for v in values if v not in ids]
    return tuple(ids)


def _scan_hf(path: Path) -> CheckpointIndex:
    config_path = path / "config.json"
    config_json = _read_json(config_path)
    config = from_hf_config(config_json, source=str(config_path))
    index_path = path / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise Llama3Error(f"{index_path}: has no weight_map object of file names; download it again")
        shard_names = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        weight_map, shard_names = None, ["model.safetensors"]
    else:
        raise Llama3Error(f"{path}: no model.safetensors or model.safetensors.index.json; llama3_np reads "
                          "Hugging Face weights in safetensors format")
    stored: dict[str, StoredTensor] = {}
    for shard_name in shard_names:
        shard_path = path / shard_name
        if Path(shard_name).name != shard_name or not shard_path.is_file():
            raise Llama3Error(f"{shard_path}: listed in {index_path.name} but missing; download it again")
        shard = SafetensorsFile(shard_path)
        for name in shard.names():
            if weight_map is not None and weight_map.get(name) != shard_name:
                raise Llama3Error(f"{shard_path}: holds tensor {name!r}, but {index_path.name} puts it in "
                                  f"{weight_map.get(name)!r}; the download is inconsistent")
            stored[name] = _stored(shard, shard_path, name)
    # Index entries whose shard does not hold the tensor: fatal only for a tensor the model needs
    # (below), as in transformers, which loads what the shards hold. A tied checkpoint whose index
    # still lists lm_head.weight is the common case.
    stale = {name: weight_map[name] for name in sorted(set(weight_map) - set(stored))} if weight_map else {}

    by_canonical: dict[str, StoredTensor] = {}
    ignored = {}
    for name, t in stored.items():
        canonical = meta_name(name)
        if canonical is None:
            why = _ignorable(name)
            if why is None:
                raise Llama3Error(f"{t.file}: unexpected tensor {name!r}; it is not part of a Llama 3 model "
                                  "(is this checkpoint a different architecture?)")
            ignored[f"{t.file.name}: {name}"] = why
            continue
        by_canonical[canonical] = t
    plans = {}
    shapes = expected_shapes(config)
    for canonical, shape in shapes.items():
        t = by_canonical.pop(canonical, None)
        if t is None:
            if canonical == "output.weight" and config.tie_embeddings:
                continue
            if hf_name(canonical) in stale:
                raise Llama3Error(f"{index_path}: puts tensor {hf_name(canonical)!r} in "
                                  f"{stale[hf_name(canonical)]!r}, which does not hold it, and no other shard "
                                  "does; download the shards again")
            raise Llama3Error(f"{path}: tensor {hf_name(canonical)!r} ({canonical}) is missing"
                              + (" (config.json says tie_word_embeddings is false)" if canonical == "output.weight"
                                 else "") + "; the download is incomplete")
        _check_dtype(t, canonical)
        if tuple(t.shape) != shape:
            raise _shape_error(t, canonical, shape, config_path.name)
        heads = {"wq": config.n_heads, "wk": config.n_kv_heads}.get(canonical.split(".")[-2])
        plans[canonical] = TensorPlan((t,), shape, unpermute_heads=heads)
    if by_canonical:  # layers beyond the config's n_layers
        canonical, t = next(iter(by_canonical.items()))
        raise Llama3Error(f"{t.file}: unexpected tensor {t.name!r}: {config_path.name} says "
                          f"{config.n_layers} layers; the config does not belong to these weights")
    if config.tie_embeddings and "output.weight" in plans:
        _check_tied_copy(plans.pop("output.weight"), plans["tok_embeddings.weight"])
    if stale:  # every tensor the model needs was found above: these entries name nothing it uses
        listed = ", ".join(f"{name!r} (listed in {shard_name!r})" for name, shard_name in stale.items())
        warn(f"{index_path}: no shard holds {listed}; the model does not need "
             f"{'it' if len(stale) == 1 else 'them'}, so the stale entry is ignored")
    return CheckpointIndex(path, "hf", config, plans, [path / n for n in shard_names], ignored,
                           eos_ids=_eos_ids(path, config_json))


def _check_tied_copy(output: TensorPlan, embeddings: TensorPlan):
    """Tied embeddings stored twice are used once, provided the copies are equal."""
    a, b = output.pieces[0], embeddings.pieces[0]
    if a.dtype != b.dtype or not np.array_equal(a.read(), b.read()):
        raise Llama3Error(f"{a.file}: tensor {a.name!r} differs from {b.name!r}, but the config says the "
                          "embeddings are tied; fix tie_word_embeddings in config.json")


# Llama 3 model-parallel layout (llama-models' ColumnParallelLinear / RowParallelLinear /
# VocabParallelEmbedding): the axis each tensor kind is split along; norms are replicated.
META_SHARD_AXIS = {
    "tok_embeddings": 0, "output": 0,
    "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0,
    "wo": 1, "w2": 1,
    "attention_norm": None, "ffn_norm": None, "norm": None,
}
_SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth")


def _shard_axis(canonical: str) -> Optional[int]:
    return META_SHARD_AXIS[canonical.split(".")[-2]]


def _download_config(path: Path) -> Optional[ModelConfig]:
    """The config.json of the Hugging Face download whose `original/` folder `path` is, if it is one."""
    folder = path.resolve()
    config_path = folder.parent / "config.json"
    if folder.name != "original" or not config_path.is_file():
        return None
    return from_hf_config(_read_json(config_path), source=str(config_path))


def _scan_meta(path: Path, rope_factor: Optional[float]) -> CheckpointIndex:
    params_path = path / "params.json"
    params = _read_json(params_path)
    shard_paths = sorted(path.glob("consolidated.*.pth"))
    numbers = [int(m.group(1)) if (m := _SHARD_RE.fullmatch(p.name)) else -1 for p in shard_paths]
    if not shard_paths:
        raise Llama3Error(f"{path}: params.json but no consolidated.NN.pth; the download is incomplete")
    if numbers != list(range(len(shard_paths))):
        raise Llama3Error(f"{path}: model-parallel shards must be consolidated.00.pth to "
                          f"consolidated.{len(shard_paths) - 1:02d}.pth without gaps; found "
                          f"{', '.join(p.name for p in shard_paths)}")
    shards = [PthFile(p) for p in shard_paths]
    names = shards[0].names()
    for shard in shards[1:]:
        if set(shard.names()) != set(names):
            odd = sorted(set(shard.names()) ^ set(names))[0]
            raise Llama3Error(f"{shard.path}: its tensors differ from {shards[0].path.name}'s (for example "
                              f"{odd!r}); the shards do not belong together")
    n = len(shards)
    tied = "output.weight" not in names
    config = from_meta_params(params, tie_embeddings=tied, rope_factor=rope_factor, source=str(params_path),
                              hf_config=_download_config(path))
    shapes = expected_shapes(config)
    ignored = {}
    for name in names:
        if name not in shapes:
            why = _ignorable(name)
            if why is None:
                raise Llama3Error(f"{shards[0].path}: unexpected tensor {name!r}; params.json says "
                                  f"{config.n_layers} layers and it is not part of a Llama 3 model")
            ignored[f"{shards[0].path.name}: {name}"] = why
    plans = {}
    for canonical, shape in shapes.items():
        if canonical == "output.weight" and tied:
            continue
        if canonical not in names:
            raise Llama3Error(f"{shards[0].path}: tensor {canonical!r} is missing; the download is incomplete")
        axis = _shard_axis(canonical) if n > 1 else None
        piece_shape = list(shape)
        if axis is not None:
            if shape[axis] % n:
                raise Llama3Error(f"{path}: {n} shards do not divide tensor {canonical!r}: dimension {axis} "
                                  f"is {shape[axis]} ({params_path.name}); is a shard missing or extra?")
            piece_shape[axis] //= n
        pieces = tuple(_stored(shard, shard.path, canonical) for shard in shards)
        for t in pieces:
            _check_dtype(t, canonical)
            if tuple(t.shape) != tuple(piece_shape):
                source = params_path.name + (f" split {n} ways" if axis is not None else "")
                raise _shape_error(t, canonical, piece_shape, source)
            if t.dtype != pieces[0].dtype:
                raise Llama3Error(f"{t.file}: tensor {canonical!r} is {t.dtype} here but {pieces[0].dtype} "
                                  f"in {pieces[0].file.name}; the shards do not belong together")
        plans[canonical] = TensorPlan(pieces, shape, shard_axis=axis)
    # Said only once the folder is known to be good: a refused one gets its one error line.
    s = config.rope_scaling
    if s is not None and s.factor_source in ("shape", "default"):
        warn(f"{params_path}: use_scaled_rope without a factor: rope factor {s.factor:g}, "
             f"{ROPE_FACTOR_SOURCES[s.factor_source]}; --rope-factor sets another", kind="note")
    return CheckpointIndex(path, "meta", config, plans, shard_paths, ignored)


# --- reading the data ----------------------------------------------------------------------------

def _materialize(plan: TensorPlan, residency: str, out: Optional[np.ndarray] = None) -> np.ndarray:
    """The canonical array of one plan, in the residency's dtype; written into `out` (float32
    residency: rows of a joined array, `_joined_rows`) when given."""
    if plan.shard_axis is None:  # one file, or replicas that must agree
        array = plan.pieces[0].read()
        for t in plan.pieces[1:]:
            if not np.array_equal(t.read(), array):
                raise Llama3Error(f"{t.file}: tensor {t.name!r} should be replicated across shards but differs "
                                  f"from {plan.pieces[0].file.name}'s; the shards do not belong together")
        if residency == "float32" and out is None:
            array = np.array(array, np.float32)
    else:
        array = out if out is not None and plan.unpermute_heads is None else np.empty(
            plan.shape, np.float32 if residency == "float32" else plan.dtype)
        step = plan.shape[plan.shard_axis] // len(plan.pieces)
        for k, t in enumerate(plan.pieces):
            where = [slice(None)] * len(plan.shape)
            where[plan.shard_axis] = slice(k * step, (k + 1) * step)
            array[tuple(where)] = t.read()
    if plan.unpermute_heads is not None:
        array = unpermute_qk(array, plan.unpermute_heads)
    if out is not None and array is not out:
        np.copyto(out, array)  # converted to float32 where it is held: no float32 copy in between
        return out
    return array


def _materialize_gguf(plan: TensorPlan, residency: str, out: Optional[np.ndarray] = None) -> Any:
    """A GGUF tensor in a residency, with its exact values (`ggml_blocks`); written into `out`
    (float32 residency: rows of a joined array) when given."""
    from .gguf_import import exact_dtype

    t = plan.pieces[0].gguf
    if residency == "float32" and out is not None:
        np.copyto(out, t.values())
        return out
    if residency == "float32":  # a new array, except an F32 tensor's view of the file, copied
        return np.array(t.values()) if t.type.name == "F32" else t.values()
    if t.type.block_size == 1:  # F32, F16, BF16: the mapped values, exact in any residency
        return t.stored()
    if residency == "gguf":
        return t.quantized()
    values = t.values()
    return values.astype(exact_dtype(values), copy=False)


def _joined_rows(index: CheckpointIndex) -> dict[str, np.ndarray]:
    """For float32 residency: each `JOINED` group's tensors as the consecutive row blocks of one new
    float32 array (its pages filled as the tensors are read: memory grows as without it), by name."""
    rows = {}
    for names in joined_names(index.config.n_layers):
        shapes = [index.plans[name].shape for name in names]
        whole = np.empty((sum(shape[0] for shape in shapes), shapes[0][1]), np.float32)
        rows.update(zip(names, row_blocks(whole, [shape[0] for shape in shapes])))
    return rows


def load_checkpoint(path, dtype: str = "float32", rope_factor: Optional[float] = None) -> Checkpoint:
    """Load a Hugging Face or Meta checkpoint folder, or a GGUF file, into the canonical form.

    path: the folder or file, or the `CheckpointIndex` a `scan_checkpoint` of it returned (then
    rope_factor is the scan's).
    dtype: residency, "float32" (convert once at load; each layer's weights that multiply one input
    as the row blocks of one array, `canonical.JOINED`), "bfloat16" (keep stored weights, mapped;
    a GGUF's quantized tensors as exact bfloat16 where they can be, else float32) or "gguf" (a GGUF
    file's tensors as stored, quantized blocks included).
    rope_factor: overrides the rope scaling factor a Meta params.json implies (`use_scaled_rope`).
    """
    if dtype not in RESIDENCIES:
        raise Llama3Error(f"dtype must be one of {', '.join(RESIDENCIES)}, got {dtype!r}")
    index = path if isinstance(path, CheckpointIndex) else scan_checkpoint(path, rope_factor)
    rows = _joined_rows(index) if dtype == "float32" else {}
    if index.format == "gguf":
        weights = {name: _materialize_gguf(plan, dtype, rows.get(name)) for name, plan in index.plans.items()}
        inexact = [name for name, plan in index.plans.items()
                   if dtype == "bfloat16" and plan.pieces[0].gguf.type.block_size > 1
                   and weights[name].dtype == np.float32]
        if inexact:
            types = sorted({index.plans[name].pieces[0].gguf.type.name for name in inexact})
            warn(f"{index.path}: {len(inexact)} of {len(index.plans)} tensors ({', '.join(types)}) have values "
                 "that bfloat16 cannot hold exactly; they are kept in float32 (--dtype gguf keeps every "
                 "tensor in the file's own blocks)", kind="note")
    elif dtype == "gguf":
        raise Llama3Error(f"{index.path}: dtype gguf keeps a GGUF file's own blocks; this is a "
                          f"{index.format} checkpoint: use float32 or bfloat16")
    else:
        weights = {name: _materialize(plan, dtype, rows.get(name)) for name, plan in index.plans.items()}
    if index.config.tie_embeddings:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    return Checkpoint(index.path, index.format, index.config, weights, dtype, index.tokenizer_dir, index.eos_ids)


# --- writing a Hugging Face folder ---------------------------------------------------------------

def hf_config_dict(c: ModelConfig) -> dict:
    """The config.json of a Hugging Face `LlamaForCausalLM` with this config (inverse of from_hf_config)."""
    scaling = None if c.rope_scaling is None else {
        "rope_type": "llama3", "factor": c.rope_scaling.factor,
        "low_freq_factor": c.rope_scaling.low_freq_factor, "high_freq_factor": c.rope_scaling.high_freq_factor,
        "original_max_position_embeddings": c.rope_scaling.original_context}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": c.dim, "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "vocab_size": c.vocab_size, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
        "rope_scaling": scaling, "max_position_embeddings": c.max_seq_len,
        "tie_word_embeddings": c.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": "bfloat16",
    }


def save_hf_checkpoint(directory, config: ModelConfig, weights: dict[str, np.ndarray], shards: int = 1,
                       extra_config: Optional[dict] = None, dtype=None, keep_dtype: bool = False):
    """Write canonical weights as a Hugging Face folder (config.json, safetensors, index if sharded).

    q/k rows are permuted back to rotate-half order and stored, like everything, as `dtype`
    (default bfloat16), or each in its own dtype with keep_dtype; tied embeddings are stored once.
    With shards > 1, tensors are dealt out in name order into model-0000N-of-0000M.safetensors
    files of about equal size.
    """
    dtype = bfloat16() if dtype is None else dtype
    directory = make_folder(directory)
    heads = {"wq": config.n_heads, "wk": config.n_kv_heads}
    tensors = {}
    for name in expected_shapes(config):
        if name == "output.weight" and config.tie_embeddings:
            continue
        w = np.asarray(weights[name])
        w = w if keep_dtype else w.astype(dtype, copy=False)
        n_heads = heads.get(name.split(".")[-2])
        tensors[hf_name(name)] = permute_qk(w, n_heads) if n_heads else w
    write_text(directory / "config.json", json.dumps(dict(hf_config_dict(config), **(extra_config or {})),
                                                     indent=2) + "\n")
    if shards == 1:
        write_safetensors(directory / "model.safetensors", tensors, {"format": "pt"})
        return
    names = sorted(tensors)
    total = sum(tensors[n].nbytes for n in names)
    weight_map, groups, size = {}, [[] for _ in range(shards)], 0
    for name in names:  # the k-th file takes the tensors starting in the k-th equal slice of bytes
        k = min(shards - 1, size * shards // total)
        groups[k].append(name)
        size += tensors[name].nbytes
    for k, group in enumerate(groups):
        file_name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(directory / file_name, {n: tensors[n] for n in group}, {"format": "pt"})
        weight_map.update({n: file_name for n in group})
    write_text(directory / "model.safetensors.index.json", json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
