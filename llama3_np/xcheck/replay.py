"""Replay: which stage of another implementation adds the error, not only where it first shows.

`compare` measures each stage of a dump against llama3_np's own forward pass: the error it shows
at a stage is everything accumulated up to there, so a small fault early and rounding that grows
along the depth look alike, and a fault that no single stage shows beyond the tolerance can still
move the logits. Replay asks each stage separately: llama3_np computes the stage from *the other
side's own input* to it (the stage contract's `reads`, `llama3_np.stages`), and two errors follow:

    local      the other's stage against llama3_np's stage computed from the other's input: the
               error this stage adds
    inherited  the other's input against llama3_np's own (a clean forward pass): the error it
               was handed

One forward pass does every stage: an intervention (a `Trace` whose keep records what llama3_np
computed, then returns the other's value) replaces every stage the dump holds by its value there,
so each stage llama3_np computes reads the other side's inputs. A stage the dump lacks (the
attention probabilities, which the torch references do not record) is computed by llama3_np from
the nearest recorded stages and is part of the next recorded stage's local error. The KV-cache
context of a dump (`context_tokens`) is llama3_np's own. Sorted by local error, the stage that
adds the error comes first even when no stage exceeds a tolerance alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np

from ..config import ModelConfig
from ..errors import Llama3Error
from ..stages import EMBED, HEAD, LAYER, Trace, split, stage_order
from .compare import DEFAULT_NMSE_TOL, StageError, stage_error
from .dump import Dump, config_differences, describe_differences, run_forward

_READS = {s.name: s.reads for s in (EMBED, *HEAD, *LAYER)}


def reads(name: str, n_layers: int) -> Optional[str]:
    """The stage `name` is computed from (`Stage.reads`), as a full name: `layers.3.attn_norm`
    reads `layers.2.out` (the layer's input x), `embed` reads the tokens (None)."""
    layer, stage = split(name)
    source = _READS[stage]
    if source == "tokens":
        return None
    if layer is None:
        return f"layers.{n_layers - 1}.{source}" if source == "out" else source
    if source == "x":
        return "embed" if layer == 0 else f"layers.{layer - 1}.out"
    return f"layers.{layer}.{source}"


class _Replaying(Trace):
    """Records what llama3_np computes at every stage, then carries the other side's value on."""

    def __init__(self, other: Mapping[str, np.ndarray]):
        super().__init__(patterns=list(other))
        self.other = other

    def keep(self, name: str, x: np.ndarray) -> np.ndarray:
        x = super().keep(name, x)
        return np.asarray(self.other[name], dtype=np.float32) if name in self.other else x


@dataclass
class ReplayedStage:
    name: str
    input: Optional[str]  # the recorded stage its input is measured at (None: the tokens)
    local: StageError
    inherited: Optional[StageError]


def replay(weights: Mapping[str, np.ndarray], config: ModelConfig, dump: Dump,
           nmse_tol: float = DEFAULT_NMSE_TOL, compute="float32") -> list[ReplayedStage]:
    """Local and inherited error of every stage `dump` holds, sorted by local NMSE (largest
    first), against llama3_np's model `weights`/`config` computing in mode `compute` (a
    `config.ComputeMode` or its name; module docstring). A stage diverges when its local NMSE
    exceeds `nmse_tol`.

    Raises Llama3Error when the dump records another model (a config field a stage reads
    differs) or gradients, has no tokens or no stage, or a stage's shape is not the model's."""
    if "targets" in dump.metadata:
        raise Llama3Error(f"{dump.path} records gradients (dL/dstage): replay takes a dump of the "
                          "stages themselves")
    recorded = dump.config()
    if recorded is not None:
        in_math, _ = config_differences(recorded, config)
        if in_math:
            raise Llama3Error(f"{dump.path} was made from a different model (config "
                              f"{describe_differences(in_math)}): pass -m the checkpoint it was made from")
    inputs = dump.inputs()
    if not inputs.tokens:
        raise Llama3Error(f"{dump.path}: its metadata has no 'tokens' to run")
    inputs.check(config)
    names = dump.names
    if not names:
        raise Llama3Error(f"{dump.path} holds no stage to replay")
    other = {n: dump.stage(n) for n in names}
    clean = Trace(["*"] + [n for n in names if split(n)[1] == "probs"])
    run_forward(weights, config, inputs, clean, compute)
    for n in names:
        if n not in clean:
            raise Llama3Error(f"{dump.path}: {n!r} is not a stage llama3_np computes for this model")
        if other[n].shape != clean[n].shape:
            raise Llama3Error(f"{dump.path}: stage {n!r} has shape {list(other[n].shape)}, this model computes "
                              f"{list(clean[n].shape)} for these tokens: was it made from another model?")
    replayed = _Replaying(other)
    run_forward(weights, config, inputs, replayed, compute)
    out = []
    for n in names:
        source = reads(n, config.n_layers)
        while source is not None and source not in other:  # the nearest recorded stage before it
            source = reads(source, config.n_layers)
        inherited = stage_error(source, other[source], clean[source], nmse_tol) if source else None
        out.append(ReplayedStage(n, source, stage_error(n, other[n], replayed[n], nmse_tol), inherited))
    return sorted(out, key=lambda r: (-r.local.nmse, stage_order(r.name)))


def replay_table(path: str, stages: list[ReplayedStage], tol: float, all_stages: bool = False) -> str:
    """The report `llama3-np compare --replay` prints: every stage (`all_stages`) or the 20 with the
    largest local error, largest first, then a verdict."""
    shown = stages if all_stages else stages[:20]
    width = max(len("stage"), *(len(r.name) for r in shown))
    in_width = max(len("input"), *(len(r.input or "tokens") for r in shown))
    lines = [f"A: {path}, each stage replayed by llama3_np on A's own input (sorted by local error)",
             f"{'stage':<{width}}  {'input':<{in_width}}  {'local NMSE':>10}  {'local max abs':>13}  "
             f"{'inherited NMSE':>14}"]
    for r in shown:
        inherited = f"{r.inherited.nmse:14.3e}" if r.inherited else f"{'-':>14}"
        mark = "  past tolerance" if r.local.diverged else ""
        lines.append(f"{r.name:<{width}}  {r.input or 'tokens':<{in_width}}  {r.local.nmse:10.3e}  "
                     f"{r.local.max_abs:13.3e}  {inherited}{mark}")
    if len(shown) < len(stages):
        lines.append(f"... {len(stages) - len(shown)} more stages (--all lists them)")
    bad = [r.name for r in stages if r.local.diverged]
    worst = stages[0]
    lines.append(f"verdict: {worst.name} adds the largest error (local NMSE {worst.local.nmse:.2e}); "
                 + (f"{len(bad)} of {len(stages)} stages add more than NMSE {tol:.0e}" if bad
                    else f"no stage adds more than NMSE {tol:.0e}"))
    return "\n".join(lines)


def replay_json(path: str, stages: list[ReplayedStage], tol: float) -> dict:
    """What `llama3-np compare --replay --json` prints (non-finite numbers as null)."""
    def err(e):
        return None if e is None else {"max_abs": _finite(e.max_abs), "nmse": _finite(e.nmse), "diverged": e.diverged}
    return {"a": path, "nmse_tol": tol, "stages": [{"name": r.name, "input": r.input, "local": err(r.local),
                                                    "inherited": err(r.inherited)} for r in stages],
            "largest_local": stages[0].name, "past_tolerance": [r.name for r in stages if r.local.diverged]}


def _finite(x: float):
    return x if math.isfinite(x) else None  # JSON has no inf or nan
