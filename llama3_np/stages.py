"""The stage contract: every named intermediate of one forward pass, its shape and the operation
that makes it (docs/DESIGN.md, "Stage contract").

This table is the one place stage names are written. `model.forward` records them through `Trace`
(which refuses a name not in the table), `llama3-np dump` writes them, `llama3-np trace` prints
them with their operations, tools/torch_reference.py records them from the torch references, and
the tests compare them.

Shapes are in the dimension legend of `llama3_np.model`: T tokens in the call, S tokens attended
to (cached + T), D model dim, F feed-forward dim, H query heads, KV key/value heads, Dh head dim,
V vocabulary. q and k stages are in Meta's interleaved rope layout, whoever produced them.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from .config import ModelConfig
from .errors import ParameterError


@dataclass(frozen=True)
class Stage:
    name: str                # within a layer, without the "layers.i." prefix
    shape: tuple[str, ...]   # legend symbols; "H*Dh" is a product
    reads: str               # the stage it is computed from ("x": the layer's input)
    operation: str
    on_request: bool = False  # large: recorded only when a pattern names it explicitly


# Before the layers, and after them.
EMBED = Stage("embed", ("T", "D"), "tokens", "tok_embeddings[tokens]")
HEAD = (
    Stage("norm", ("T", "D"), "out", "rmsnorm(out of the last layer) * norm"),
    Stage("logits", ("T", "V"), "norm", "norm @ output.T"),
)

# One transformer block, in the order it computes them.
LAYER = (
    Stage("attn_norm", ("T", "D"), "x", "rmsnorm(x) * attention_norm"),
    Stage("q", ("T", "H", "Dh"), "attn_norm", "attn_norm @ wq.T, split into heads"),
    Stage("k", ("T", "KV", "Dh"), "attn_norm", "attn_norm @ wk.T, split into KV heads"),
    Stage("v", ("T", "KV", "Dh"), "attn_norm", "attn_norm @ wv.T, split into KV heads"),
    Stage("q_rope", ("T", "H", "Dh"), "q", "rope(q, positions)"),
    Stage("k_rope", ("T", "KV", "Dh"), "k", "rope(k, positions)"),
    Stage("probs", ("H", "T", "S"), "q_rope", "softmax(q_rope k_rope.T / sqrt(Dh) + causal mask)",
          on_request=True),
    Stage("attn", ("T", "H*Dh"), "probs", "probs @ v, heads concatenated"),
    Stage("attn_out", ("T", "D"), "attn", "attn @ wo.T"),
    Stage("h", ("T", "D"), "attn_out", "x + attn_out"),
    Stage("ffn_norm", ("T", "D"), "h", "rmsnorm(h) * ffn_norm"),
    Stage("ffn_hidden", ("T", "F"), "ffn_norm", "silu(ffn_norm @ w1.T) * (ffn_norm @ w3.T)"),
    Stage("ffn_out", ("T", "D"), "ffn_hidden", "ffn_hidden @ w2.T"),
    Stage("out", ("T", "D"), "ffn_out", "h + ffn_out"),
)
LAYER_STAGES = tuple(s.name for s in LAYER)
ON_REQUEST = frozenset(s.name for s in LAYER if s.on_request)
_LAYER_INDEX = {name: i for i, name in enumerate(LAYER_STAGES)}
_HEAD_INDEX = {s.name: i for i, s in enumerate(HEAD)}


def legend(config: ModelConfig, n_tokens: int, n_context: int = 0) -> dict[str, int]:
    """The value of each legend symbol for `n_tokens` tokens after `n_context` cached ones."""
    return {"T": n_tokens, "S": n_context + n_tokens, "D": config.dim, "F": config.ffn_dim,
            "H": config.n_heads, "KV": config.n_kv_heads, "Dh": config.head_dim, "V": config.vocab_size}


def symbols(name: str) -> str:
    """The shape of stage `name` in the legend's symbols: 'layers.3.q' -> '[T, H, Dh]'."""
    layer, stage = split(name)
    table = {s.name: s for s in LAYER} if layer is not None else {s.name: s for s in (EMBED, *HEAD)}
    return "[" + ", ".join(table[stage].shape) + "]"


def stage_shapes(config: ModelConfig, n_tokens: int, n_context: int = 0,
                 probs: bool = True) -> dict[str, tuple[int, ...]]:
    """Every stage name of one forward pass over `n_tokens` tokens after `n_context` cached ones,
    in model order, with its shape. probs: include the on-request attention probabilities."""
    sizes = legend(config, n_tokens, n_context)

    def shape(stage: Stage) -> tuple[int, ...]:
        return tuple(math.prod(sizes[s] for s in dim.split("*")) for dim in stage.shape)

    shapes = {EMBED.name: shape(EMBED)}
    for i in range(config.n_layers):
        shapes.update({f"layers.{i}.{s.name}": shape(s) for s in LAYER if probs or not s.on_request})
    shapes.update({s.name: shape(s) for s in HEAD})
    return shapes


def split(name: str) -> tuple[int | None, str]:
    """'layers.3.q' -> (3, 'q'); 'embed' -> (None, 'embed')."""
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return None, name


def is_stage(name: str) -> bool:
    layer, stage = split(name)
    return stage in _LAYER_INDEX if layer is not None else (stage == EMBED.name or stage in _HEAD_INDEX)


def stage_order(name: str) -> tuple:
    """Sort key putting stage names in model order; names that are not stages go last."""
    layer, stage = split(name)
    if layer is None and stage == EMBED.name:
        return (0,)
    if layer is not None and stage in _LAYER_INDEX:
        return (1, layer, _LAYER_INDEX[stage])
    if layer is None and stage in _HEAD_INDEX:
        return (2, _HEAD_INDEX[stage])
    return (3, name)


def check_globs(globs: Iterable[str], names: Iterable[str]) -> list[str]:
    """The globs, each checked to match at least one of the stage `names`.

    Raises ParameterError("stages") naming the stages there are."""
    globs, names = list(globs), list(names)
    for glob in globs:
        if not any(fnmatch.fnmatchcase(n, glob) for n in names):
            layer_stages = [s for s in LAYER_STAGES if f"layers.0.{s}" in names]
            last_layer = max((stage_order(n)[1] for n in names if stage_order(n)[0] == 1), default=0)
            raise ParameterError("stages", f"{glob!r} matches no stage; stages are embed, "
                                 f"layers.N.{{{','.join(layer_stages)}}} (N from 0 to {last_layer}), norm, logits")
    return globs


# ---------------------------------------------------------------------------------------------
# Recording

Keep = Callable[[str, np.ndarray], np.ndarray]


def keep_nothing(name: str, x: np.ndarray) -> np.ndarray:
    """The `keep` of an untraced forward pass: returns its input, records nothing."""
    return x


class Trace(dict):
    """The named stages of one forward call, in model order, as float32 copies.

    `patterns` are shell-style globs over stage names (`layers.3.*`, `logits`); stages recorded on
    request (attention probabilities `layers.i.probs`, [H, T, S]) are kept only when a pattern other
    than `*` names them.
    """

    def __init__(self, patterns=("*",)):
        super().__init__()
        self.patterns = tuple(patterns)

    def wants(self, name: str) -> bool:
        if split(name)[1] in ON_REQUEST:
            return any(p != "*" and fnmatch.fnmatchcase(name, p) for p in self.patterns)
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def keep(self, name: str, x: np.ndarray) -> np.ndarray:
        """Record stage `name` if wanted; return `x` unchanged."""
        if not is_stage(name):
            raise KeyError(f"{name!r} is not a stage of llama3_np.stages")
        if self.wants(name):
            self.record(name, x)
        return x

    def record(self, name: str, x: np.ndarray) -> None:
        self[name] = np.array(x, dtype=np.float32)  # a copy: buffers may be reused later

    def scoped(self, prefix: str) -> Keep:
        """A `keep(name, x)` that records `prefix + name` (`prefix` is "layers.i." in a block)."""
        return lambda name, x: self.keep(prefix + name, x)


def scoped(trace: Trace | None, prefix: str) -> Keep:
    """`trace.scoped(prefix)`, or `keep_nothing` without a trace."""
    return keep_nothing if trace is None else trace.scoped(prefix)
