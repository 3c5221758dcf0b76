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
from .errors import Llama3Error, ParameterError


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


# ---------------------------------------------------------------------------------------------
# Interventions: an edit is a `keep` that returns a changed value.

EDIT_OPS = ("replace", "add", "scale", "ablate")


def head_axis(name: str) -> tuple[int, str] | None:
    """The axis of stage `name` that indexes heads, and which heads ("H" or "KV"); None for a
    stage without heads. `attn` ([T, H*Dh]) has them once viewed as [T, H, Dh]: axis 1."""
    layer, stage = split(name)
    if layer is None:
        return None
    shape = next(s for s in LAYER if s.name == stage).shape
    for axis, dim in enumerate(shape):
        if dim in ("H", "KV", "H*Dh"):
            return axis, dim.split("*")[0]
    return None


def token_axis(name: str) -> int:
    """The axis of stage `name` that indexes the call's tokens (T)."""
    layer, stage = split(name)
    table = {s.name: s for s in (LAYER if layer is not None else (EMBED, *HEAD))}
    return table[stage].shape.index("T")


@dataclass(frozen=True)
class Edit:
    """A change to the value of the stages `stage` (a name or a glob: `layers.3.attn_out`,
    `layers.*.q`) as a forward pass computes them; what follows computes from the changed value.

    op: "replace" (by `value`), "add" (`value`), "scale" (multiply by `value`), "ablate" (set to
    0). value: an array broadcast to the part edited, or a number. heads: only these heads (a
    stage with a head axis: q, k, v, q_rope, k_rope, probs, attn; k, v and k_rope count KV heads).
    tokens: only these tokens of the call (indices along the stage's T axis).
    """

    stage: str
    op: str
    value: object = None
    heads: tuple[int, ...] | None = None
    tokens: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.op not in EDIT_OPS:
            raise Llama3Error(f"edit op must be one of {', '.join(EDIT_OPS)}, got {self.op!r}")
        if (self.value is None) != (self.op == "ablate"):
            raise Llama3Error(f"edit {self.op!r} of {self.stage}: "
                                          + ("ablate takes no value" if self.op == "ablate" else "give a value"))

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.stage)

    def apply(self, name: str, x: np.ndarray, sizes: dict[str, int]) -> np.ndarray:
        """x, the value of stage `name`, with this edit applied: a new array of x's dtype (x is
        not changed). sizes: the legend's values seen so far in the pass (`Trace` learns them from
        the stages' shapes), which split [T, H*Dh] into heads."""
        out = np.array(x)
        view = out
        if self.heads is not None:
            found = head_axis(name)
            if found is None:
                raise Llama3Error(f"stage {name} has no heads: edit it without heads")
            axis, symbol = found
            if out.ndim == 2:  # attn [T, H*Dh]: its heads are axis 1 of [T, H, Dh]
                view = out.reshape(out.shape[0], sizes[symbol], -1)
            if max(self.heads) >= view.shape[axis] or min(self.heads) < 0:
                raise Llama3Error(f"stage {name} has {view.shape[axis]} heads, an edit names head "
                                              f"{max(self.heads) if max(self.heads) >= view.shape[axis] else min(self.heads)}")
        index = [np.arange(n) for n in view.shape]
        if self.heads is not None:
            index[axis] = np.asarray(self.heads)
        if self.tokens is not None:
            t = token_axis(name)
            if max(self.tokens) >= view.shape[t] or min(self.tokens) < 0:
                raise Llama3Error(f"stage {name} has {view.shape[t]} tokens, an edit names token "
                                              f"{max(self.tokens)}")
            index[t] = np.asarray(self.tokens)
        index = np.ix_(*index)
        part = view[index]
        value = None if self.value is None else np.asarray(self.value, dtype=out.dtype)
        if self.op == "replace":
            part = np.broadcast_to(value, part.shape)
        elif self.op == "add":
            part = part + value
        elif self.op == "scale":
            part = part * value
        else:
            part = np.zeros_like(part)
        view[index] = part
        return out


def _learn_sizes(sizes: dict[str, int], name: str, shape: tuple[int, ...]) -> None:
    layer, stage = split(name)
    table = {s.name: s for s in (LAYER if layer is not None else (EMBED, *HEAD))}
    for symbol, n in zip(table[stage].shape, shape):
        if "*" not in symbol:
            sizes[symbol] = n


def start_point(start_from: tuple[str, np.ndarray], n_layers: int, x: np.ndarray, cache_length: int,
                cache_max_len: int) -> tuple[int, np.ndarray]:
    """Where a forward pass resumes from a given value of the residual stream: `("embed", v)`
    resumes at layer 0, `("layers.i.out", v)` at layer i + 1 (i = n_layers - 1: at the final
    norm). x: the stream this pass would carry there ([T, D]); returns (the first layer to run, v
    as x's dtype). The layers skipped write no keys and values, so the KV cache must be one that
    holds these tokens only (length 0, room for T: `forward` makes one when given none).

    Raises Llama3Error for another stage, a value of another shape, or another cache."""
    name, value = start_from
    layer, stage = split(name)
    if not ((layer is None and stage == EMBED.name) or (layer is not None and stage == "out" and layer < n_layers)):
        raise Llama3Error(f"a forward pass starts from embed or layers.i.out (i from 0 to {n_layers - 1}), "
                          f"not {name!r}: to change another stage, edit it (Edit)")
    value = np.asarray(value)
    if value.shape != x.shape:
        raise Llama3Error(f"the value to start from at {name} has shape {list(value.shape)}, these tokens' is "
                          f"{list(x.shape)}")
    if cache_length != 0 or cache_max_len != x.shape[0]:
        raise Llama3Error("a forward pass that starts from a stage skips the layers before it, whose keys and "
                          "values it cannot store: give it no KV cache")
    return (0 if layer is None else layer + 1), value.astype(x.dtype)


class Trace(dict):
    """The named stages of one forward call, in model order, as copies (float32, or float64 in the
    float64 compute mode), and the edits made to them (interventions).

    `patterns` are shell-style globs over stage names (`layers.3.*`, `logits`); stages recorded on
    request (attention probabilities `layers.i.probs`, [H, T, S]) are kept only when a pattern other
    than `*` names them. `edits` (`Edit`s, applied in order to every stage they match) change what
    the forward pass carries on; a stage is recorded as edited.
    """

    def __init__(self, patterns=("*",), edits=()):
        super().__init__()
        self.patterns = tuple(patterns)
        self.edits = tuple(edits)
        for edit in self.edits:
            if not isinstance(edit, Edit):
                raise Llama3Error(f"edits must be Edit values, got {edit!r}")
        self._sizes: dict[str, int] = {}  # legend values seen in the pass (see Edit.apply)

    def wants(self, name: str) -> bool:
        if split(name)[1] in ON_REQUEST:
            return any(p != "*" and fnmatch.fnmatchcase(name, p) for p in self.patterns)
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def keep(self, name: str, x: np.ndarray) -> np.ndarray:
        """Apply the edits that match stage `name` to x, record it if wanted, and return it
        (x itself when no edit matches)."""
        if not is_stage(name):
            raise KeyError(f"{name!r} is not a stage of llama3_np.stages")
        if self.edits:
            _learn_sizes(self._sizes, name, np.shape(x))
            for edit in self.edits:
                if edit.matches(name):
                    x = edit.apply(name, x, self._sizes)
        if self.wants(name):
            self.record(name, x)
        return x

    def record(self, name: str, x: np.ndarray) -> None:
        # A copy (buffers may be reused later), float32 unless the pass computes in float64.
        self[name] = np.array(x, dtype=np.float64 if np.asarray(x).dtype == np.float64 else np.float32)

    def scoped(self, prefix: str) -> Keep:
        """A `keep(name, x)` that records `prefix + name` (`prefix` is "layers.i." in a block)."""
        return lambda name, x: self.keep(prefix + name, x)


def scoped(trace: Trace | None, prefix: str) -> Keep:
    """`trace.scoped(prefix)`, or `keep_nothing` without a trace."""
    return keep_nothing if trace is None else trace.scoped(prefix)
