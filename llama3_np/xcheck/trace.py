"""`llama3-np trace`: one forward pass walked stage by stage, with the shape of every step.

For each stage: its name, the operation that makes it, the shape it reads and the shape it writes
(`[17, 576] -> [17, 9, 64]`), and its mean, standard deviation and largest magnitude. The stages
are the named stages of the forward pass (`llama3_np.stages`), recorded by `model.forward` itself, so the
shapes are those of the real computation, not a description of it.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import ParameterError
from ..stages import EMBED, HEAD, LAYER, Trace
from .dump import format_shape


class StatsTrace(Trace):
    """A Trace that keeps each stage's shape and statistics instead of a copy of the array, so
    that even the attention probabilities of every layer cost no memory."""

    def record(self, name: str, x: np.ndarray) -> None:
        x64 = np.asarray(x, dtype=np.float64)
        self[name] = (tuple(x.shape), float(x64.mean()), float(x64.std()), float(np.abs(x64).max()))


def parse_layers(text: Optional[str], n_layers: Optional[int]) -> list[int]:
    """'0,3,10-12' -> [0, 3, 10, 11, 12]; None -> every layer. n_layers None: the syntax only,
    before the model is known."""
    if text is None:
        return list(range(n_layers or 0))
    layers: set[int] = set()
    try:
        for part in text.replace(" ", "").split(","):
            first, _, last = part.partition("-")
            first, last = int(first), int(last or first)
            if last < first:
                raise ParameterError("layers", f"{text!r}: the range {part} runs backwards; write it {last}-{first}")
            layers.update(range(first, last + 1))
    except ValueError:
        raise ParameterError("layers", f"layers takes layer numbers and ranges like 0,3,10-12, got {text!r}") from None
    bad = sorted(i for i in layers if i < 0 or (n_layers is not None and i >= n_layers))
    if bad or not layers:
        raise ParameterError("layers", f"{text!r}: the model has layers 0 to {n_layers - 1}")
    return sorted(layers)


def trace_rows(trace: StatsTrace, layers: list[int], n_tokens: int,
               n_layers: int) -> list[tuple[str, str, str, tuple]]:
    """(stage, operation, 'in -> out' shapes, (mean, std, max abs)) for every traced stage, in model order."""
    rows = []

    def row(name, source_shape, op):
        shape, mean, std, max_abs = trace[name]
        rows.append((name, op, f"{format_shape(source_shape)} -> {format_shape(shape)}", (mean, std, max_abs)))

    row(EMBED.name, (n_tokens,), EMBED.operation)
    for i in layers:
        x = trace[f"layers.{i - 1}.out"][0] if i > 0 else trace[EMBED.name][0]
        for stage in LAYER:
            source_shape = x if stage.reads == "x" else trace[f"layers.{i}.{stage.reads}"][0]
            row(f"layers.{i}.{stage.name}", source_shape, stage.operation)
    head_input = f"layers.{n_layers - 1}.out"
    for stage in HEAD:
        row(stage.name, trace[head_input if stage.reads == "out" else stage.reads][0], stage.operation)
    return rows


def format_trace(rows, header: str) -> str:
    w_name = max(len(r[0]) for r in rows)
    w_op = max(len(r[1]) for r in rows)
    w_shape = max(len(r[2]) for r in rows)
    lines = [header, f"{'stage':<{w_name}}  {'operation':<{w_op}}  {'shape':<{w_shape}}  "
                     f"{'mean':>10}  {'std':>10}  {'max |x|':>10}"]
    for name, op, shapes, (mean, std, max_abs) in rows:
        lines.append(f"{name:<{w_name}}  {op:<{w_op}}  {shapes:<{w_shape}}  "
                     f"{mean:10.4g}  {std:10.4g}  {max_abs:10.4g}")
    return "\n".join(lines)
