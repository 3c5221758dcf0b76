"""The dump file: every named stage of one forward pass, for comparing implementations.

The format (docs/DESIGN.md, "Dump files") is shared by everything that cross-checks an
implementation: `llama3-np dump`, tools/torch_dump.py (Hugging Face and Meta's reference), the
committed parity fixtures, and any other implementation that wants to be compared with
`llama3-np compare`:

    a safetensors file, one float32 tensor per stage, named and shaped as `llama3_np.stages`
    says (q/k in Meta's interleaved rope layout), and the string metadata of `METADATA`; llama3_np
    adds residency (how it kept the weights: float32, bfloat16, float16 or float64), format (of the
    checkpoint folder: hf or meta) and, in bfloat16 and float16, convention (whose cast points it
    followed: transformers or meta).

Two dumps record the same computation when their inputs (config, tokens, positions, context)
agree; config fields no stage reads (`CONFIG_FIELDS_OUTSIDE_THE_MATH`) may differ, so that dumps
of the same weights from a Hugging Face and a Meta folder compare (`metadata_differences`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np

from .. import __version__
from ..checks import token_ids
from ..config import ComputeMode, ModelConfig
from ..errors import Llama3Error, ParameterError
from ..formats.safetensors_file import SafetensorsFile, write_safetensors
from ..model import KVCache, forward
from ..stages import Trace, stage_order

# The metadata keys of a dump file (all values are strings), and what each holds.
METADATA = {
    "config": "JSON of the model's ModelConfig.to_dict()",
    "tokens": "JSON list of the token ids run",
    "pos": "rope position of the first of them",
    "context_tokens": "JSON list of the token ids in the KV cache before them",
    "context_pos": "rope position of the first context token",
    "producer": "the implementation and version that wrote the file",
    "dtype": "what the producer computed in (float64, float32, bfloat16 or float16)",
}
# The keys that say which computation a dump records: two dumps to compare must agree on them.
INPUT_KEYS = ("config", "tokens", "pos", "context_tokens", "context_pos")
# ModelConfig fields that no stage of a forward pass reads: how a checkpoint stores its output
# projection (a Meta folder keeps a copy of the embeddings where a Hugging Face folder says
# tie_word_embeddings) and the context it was trained for. Every other field changes the math.
CONFIG_FIELDS_OUTSIDE_THE_MATH = ("tie_embeddings", "max_seq_len")
# Metadata that names who made a dump, shown beside its path rather than listed as a difference.
PRODUCER_KEYS = ("producer", "dtype")


@dataclass
class Inputs:
    """What one forward pass runs: tokens at rope position `pos`, after `context` (in the KV cache
    first, from `context_pos`)."""

    tokens: list[int]
    pos: int
    context: list[int]
    context_pos: int
    notes: list[str] = field(default_factory=list)  # what the user should know (printed on stderr)

    def check(self, config: ModelConfig) -> None:
        """Raise Llama3Error unless there are tokens, all in the vocabulary, at positions >= 0."""
        if not self.tokens:
            raise Llama3Error("no tokens to run: give some text or token ids")
        token_ids(self.context + self.tokens, config.vocab_size)
        if min(self.pos, self.context_pos) < 0:
            raise Llama3Error("rope positions must be >= 0")


def resolve_inputs(config: ModelConfig, *, text: Optional[str] = None, tokens: Optional[list[int]] = None,
                   like: Optional[str] = None, pos: Optional[int] = None,
                   encode: Optional[Callable[[str], list[int]]] = None, model: object = "the model") -> Inputs:
    """The inputs of one forward pass, from exactly one of: `text` (tokenized by `encode`, the
    model's tokenizer as it adds BOS), `tokens` (ids), or `like` (the path of a dump file whose
    tokens, positions and KV-cache context are run again; its model must be `config`'s, `model`
    naming it in errors). `pos`: the rope position of the first token (0 when None; not with `like`).

    `dump` and `tools/torch_dump.py` both read their inputs here, so that the two sides of a
    comparison run the same ids. Raises ParameterError("pos" or "like") and Llama3Error.
    """
    if pos is not None and pos < 0:
        raise ParameterError("pos", f"the position must be >= 0, got {pos}")
    if pos is not None and like is not None:
        raise ParameterError("pos", "a position goes with text or token ids; a dump to run again brings its own")
    pos = pos or 0
    if like is not None:
        dump = read_dump(like)
        in_math, outside = config_differences(dump.config(), config) if dump.config() is not None else ({}, {})
        if in_math:
            raise ParameterError("like", f"{like} was made from a different model than {model} "
                                         f"(config {describe_differences(in_math)}): pass the same checkpoint")
        inputs = dump.inputs()
        inputs.notes = [f"the config recorded in {like} differs from {model}'s only in what no stage computes: "
                        f"{describe_differences(outside)}"] if outside else []
        if not inputs.tokens:
            raise ParameterError("like", f"{like}: its metadata has no 'tokens' to run")
    elif tokens is not None:
        inputs = Inputs(list(tokens), pos, [], pos)
    elif text is not None:
        if text == "":
            raise Llama3Error("the text is empty: give some text")
        inputs = Inputs(encode(text), pos, [], pos)
    else:
        raise Llama3Error("no input: give text, token ids or a dump to run again")
    inputs.check(config)
    return inputs


def dump_metadata(config: ModelConfig, inputs: Inputs, dtype: str, producer: Optional[str] = None,
                  **extra: str) -> dict[str, str]:
    """The metadata of a dump of `inputs` through `config`'s model (every key of METADATA, then
    `extra`). producer: default this llama3_np."""
    metadata = {"config": config.to_json(), "tokens": json.dumps(inputs.tokens), "pos": str(inputs.pos),
                "context_tokens": json.dumps(inputs.context), "context_pos": str(inputs.context_pos),
                "producer": producer or f"llama3_np {__version__}", "dtype": dtype}
    return {**metadata, **extra}


def convention_metadata(mode: ComputeMode) -> dict[str, str]:
    """llama3_np's `convention` key: where a bfloat16/float16 dump rounded (transformers or meta);
    nothing for float32 and float64, which have no convention."""
    return {"convention": mode.convention} if mode.casts else {}


def run_forward(weights: Mapping[str, np.ndarray], config: ModelConfig, inputs: Inputs, trace: Trace,
                compute="float32") -> None:
    """Fill `trace` with the stages of `inputs.tokens`, after feeding the context to the cache, in
    compute mode `compute` (`config.ComputeMode` or its name)."""
    cache = KVCache(config, len(inputs.context) + len(inputs.tokens), compute)
    if inputs.context:
        forward(weights, config, inputs.context, cache, pos=inputs.context_pos)
    forward(weights, config, inputs.tokens, cache, pos=inputs.pos, trace=trace)


def format_shape(shape) -> str:
    """(5, 576) -> '[5, 576]'."""
    return "[" + ", ".join(str(d) for d in shape) + "]"


# ---------------------------------------------------------------------------------------------
# Do two dumps record the same computation?


def config_differences(a: ModelConfig, b: ModelConfig) -> tuple[dict, dict]:
    """The fields in which two configs differ, {field: (value in a, value in b)}, split into those
    that change the math and those no stage reads (`CONFIG_FIELDS_OUTSIDE_THE_MATH`)."""
    da, db = a.to_dict(), b.to_dict()
    differ = {k: (da[k], db[k]) for k in da if da[k] != db[k]}
    in_math = {k: v for k, v in differ.items() if k not in CONFIG_FIELDS_OUTSIDE_THE_MATH}
    return in_math, {k: v for k, v in differ.items() if k in CONFIG_FIELDS_OUTSIDE_THE_MATH}


def describe_differences(differences: dict) -> str:
    """`{"dim": (64, 32)}` -> `dim 64 vs 32`."""
    return "; ".join(f"{k} {json.dumps(va)} vs {json.dumps(vb)}" for k, (va, vb) in differences.items())


def metadata_differences(a: Dump, b: Dump) -> dict[str, tuple[str, str]]:
    """The metadata in which dumps `a` and `b` differ without recording different computations,
    {key: (value in a, value in b)}: config fields outside the math (as `config.<field>`) and
    other keys both files have (residency, format, a reference's settings), except the producer
    and dtype (`PRODUCER_KEYS`), which say who made each file.

    Raises Llama3Error when they record different computations: the config's math (dimensions,
    norm eps, rope), the tokens, the positions or the KV-cache context differ, or one holds
    gradients (a `targets` key: `llama3-np dump --grad`) and the other does not, or the targets differ.
    """
    listed: dict[str, tuple[str, str]] = {}
    if ("targets" in a.metadata) != ("targets" in b.metadata):
        grad, act = (a, b) if "targets" in a.metadata else (b, a)
        raise Llama3Error(f"{grad.path} records gradients (dL/dstage) and {act.path} the stages "
                          "themselves; compare a gradient dump with another gradient dump")
    if "targets" in a.metadata and a.json_list("targets") != b.json_list("targets"):
        raise Llama3Error(f"{a.path} and {b.path} are gradients of different losses: metadata 'targets' differs "
                          f"({_short(a.metadata['targets'])} vs {_short(b.metadata['targets'])})")
    for key in INPUT_KEYS:
        if key not in a.metadata or key not in b.metadata:
            continue
        if key == "config":
            in_math, outside = config_differences(a.config(), b.config())
            same = not in_math
            listed.update({f"config.{k}": tuple(json.dumps(v) for v in values) for k, values in outside.items()})
            shown = describe_differences(in_math)
        elif key in ("tokens", "context_tokens"):
            same = a.json_list(key) == b.json_list(key)
        else:
            same = a.integer(key, 0) == b.integer(key, 0)
        if not same:
            shown = shown if key == "config" else f"{_short(a.metadata[key])} vs {_short(b.metadata[key])}"
            raise Llama3Error(f"{a.path} and {b.path} record different inputs: metadata {key!r} differs "
                              f"({shown}); dump the same model on the same tokens")
    for key in sorted(set(a.metadata) & set(b.metadata)):
        if key not in INPUT_KEYS and key not in PRODUCER_KEYS and a.metadata[key] != b.metadata[key]:
            listed[key] = (a.metadata[key], b.metadata[key])
    return listed


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


# ---------------------------------------------------------------------------------------------
# Reading and writing dump files


@dataclass
class Dump:
    """One dump file: its metadata and its stage tensors (memory-mapped, read on demand)."""

    path: Path
    file: SafetensorsFile

    @property
    def metadata(self) -> dict[str, str]:
        return self.file.metadata

    @property
    def names(self) -> list[str]:
        """Stage names, in model order."""
        return sorted(self.file.names(), key=stage_order)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file.shape(name)

    def stage(self, name: str) -> np.ndarray:
        return self.file.tensor(name)

    def json_list(self, key: str) -> Optional[list[int]]:
        """A metadata key holding a JSON list of token ids (None when absent)."""
        if key not in self.metadata:
            return None
        try:
            value = json.loads(self.metadata[key])
        except ValueError:
            value = None
        if not (isinstance(value, list) and all(type(t) is int for t in value)):
            raise Llama3Error(f"{self.path}: metadata {key!r} must be a JSON list of token ids, "
                              f"got {self.metadata[key][:80]!r}")
        return value

    def integer(self, key: str, default: int) -> int:
        try:
            return int(self.metadata.get(key, default))
        except ValueError:
            raise Llama3Error(f"{self.path}: metadata {key!r} must be an integer, "
                              f"got {self.metadata[key][:80]!r}") from None

    def inputs(self) -> "Inputs":
        """The tokens, positions and context this dump records (empty tokens when it has none)."""
        pos = self.integer("pos", 0)
        return Inputs(self.json_list("tokens") or [], pos, self.json_list("context_tokens") or [],
                      self.integer("context_pos", pos))

    def config(self) -> Optional[ModelConfig]:
        if "config" not in self.metadata:
            return None
        try:
            return ModelConfig.from_dict(json.loads(self.metadata["config"]))
        except (ValueError, TypeError, KeyError) as e:
            raise Llama3Error(f"{self.path}: metadata 'config' is not a llama3_np ModelConfig ({e})") from None
        except Llama3Error as e:
            raise Llama3Error(f"{self.path}: metadata 'config': {e}") from None


def read_dump(path) -> Dump:
    """Open a dump file, checking that it is safetensors holding floating-point stages."""
    path = Path(path)
    if not path.is_file():
        raise Llama3Error(f"dump file {path} does not exist" if not path.exists()
                          else f"{path} is not a file: pass a dump file (.safetensors)")
    file = SafetensorsFile(path)
    for name in file.names():
        if file.dtype(name).kind != "f":
            raise Llama3Error(f"{path}: stage {name!r} is stored as {file.dtype(name)}; "
                              "dump files hold floating-point stages")
    return Dump(path, file)


def write_dump(path, stages: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """Write a dump file: every stage as float32, and string metadata (see `dump_metadata`).

    Raises Llama3Error when the file cannot be written (nothing is left behind)."""
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise TypeError(f"metadata {key} must be a string, got {value!r}")
    write_safetensors(path, {k: np.asarray(v, dtype=np.float32) for k, v in stages.items()}, metadata)
