"""The dump file: every named stage of one forward pass, for comparing implementations.

The format (docs/DESIGN.md, "Dump files") is shared by everything that cross-checks an
implementation: `llama3-np dump`, tools/torch_dump.py (Hugging Face and Meta's reference), the
committed parity fixtures, and any other implementation that wants to be compared with
`llama3-np compare`:

    a safetensors file, one float32 tensor per stage, named and shaped as `llama3_np.stages`
    says (q/k in Meta's interleaved rope layout), and the string metadata of `METADATA`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from .. import __version__
from ..checks import token_ids
from ..config import ModelConfig
from ..errors import Llama3Error
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
    "dtype": "what the producer computed in (float32 or bfloat16)",
}
# The keys that say which computation a dump records: two dumps to compare must agree on them.
INPUT_KEYS = ("config", "tokens", "pos", "context_tokens", "context_pos")


@dataclass
class Inputs:
    """What one forward pass runs: tokens at rope position `pos`, after `context` (in the KV cache
    first, from `context_pos`)."""

    tokens: list[int]
    pos: int
    context: list[int]
    context_pos: int

    def check(self, config: ModelConfig) -> None:
        """Raise Llama3Error unless there are tokens, all in the vocabulary, at positions >= 0."""
        if not self.tokens:
            raise Llama3Error("no tokens to run: give some text or token ids")
        token_ids(self.context + self.tokens, config.vocab_size)
        if min(self.pos, self.context_pos) < 0:
            raise Llama3Error("rope positions must be >= 0")


def dump_metadata(config: ModelConfig, inputs: Inputs, dtype: str, producer: Optional[str] = None,
                  **extra: str) -> dict[str, str]:
    """The metadata of a dump of `inputs` through `config`'s model (every key of METADATA, then
    `extra`). producer: default this llama3_np."""
    metadata = {"config": config.to_json(), "tokens": json.dumps(inputs.tokens), "pos": str(inputs.pos),
                "context_tokens": json.dumps(inputs.context), "context_pos": str(inputs.context_pos),
                "producer": producer or f"llama3_np {__version__}", "dtype": dtype}
    return {**metadata, **extra}


def run_forward(weights: Mapping[str, np.ndarray], config: ModelConfig, inputs: Inputs, trace: Trace) -> None:
    """Fill `trace` with the stages of `inputs.tokens`, after feeding the context to the cache."""
    cache = KVCache(config, len(inputs.context) + len(inputs.tokens))
    if inputs.context:
        forward(weights, config, inputs.context, cache, pos=inputs.context_pos)
    forward(weights, config, inputs.tokens, cache, pos=inputs.pos, trace=trace)


def format_shape(shape) -> str:
    """(5, 576) -> '[5, 576]'."""
    return "[" + ", ".join(str(d) for d in shape) + "]"


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
