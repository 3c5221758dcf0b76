"""`llama3-np trace`: one forward pass walked stage by stage, with the shape of every step.

For each stage: its name, the operation that makes it, the shape it reads and the shape it writes
(`[17, 576] -> [17, 9, 64]`), and its mean, standard deviation and largest magnitude. The stages
are the named stages of the forward pass (DESIGN.md), recorded by `model.forward` itself, so the
shapes are those of the real computation, not a description of it.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .dump_cmd import LAYER_STAGES, add_input_args, format_shape, load_with_inputs, run_forward
from .errors import Llama3Error
from .model import Trace

# stage -> (the stage it reads, the operation); "x" is the layer's input (the previous layer's out).
LAYER_FLOW = {
    "attn_norm": ("x", "rmsnorm(x) * attention_norm"),
    "q": ("attn_norm", "attn_norm @ wq.T, split into heads"),
    "k": ("attn_norm", "attn_norm @ wk.T, split into KV heads"),
    "v": ("attn_norm", "attn_norm @ wv.T, split into KV heads"),
    "q_rope": ("q", "rope(q, positions)"),
    "k_rope": ("k", "rope(k, positions)"),
    "probs": ("q_rope", "softmax(q_rope k_rope.T / sqrt(Dh) + causal mask)"),
    "attn": ("probs", "probs @ v, heads concatenated"),
    "attn_out": ("attn", "attn @ wo.T"),
    "h": ("attn_out", "x + attn_out"),
    "ffn_norm": ("h", "rmsnorm(h) * ffn_norm"),
    "ffn_hidden": ("ffn_norm", "silu(ffn_norm @ w1.T) * (ffn_norm @ w3.T)"),
    "ffn_out": ("ffn_hidden", "ffn_hidden @ w2.T"),
    "out": ("ffn_out", "h + ffn_out"),
}
assert tuple(LAYER_FLOW) == LAYER_STAGES


class StatsTrace(Trace):
    """A Trace that keeps each stage's shape and statistics instead of a copy of the array, so
    that even the attention probabilities of every layer cost no memory."""

    def keep(self, name: str, x: np.ndarray) -> None:
        if self.wants(name):
            x64 = np.asarray(x, dtype=np.float64)
            self[name] = (tuple(x.shape), float(x64.mean()), float(x64.std()), float(np.abs(x64).max()))


def parse_layers(text: Optional[str], n_layers: Optional[int]) -> list[int]:
    """'0,3,10-12' -> [0, 3, 10, 11, 12]; None -> every layer. n_layers None: check the syntax only."""
    if text is None:
        return list(range(n_layers or 0))
    layers: set[int] = set()
    try:
        for part in text.replace(" ", "").split(","):
            first, _, last = part.partition("-")
            first, last = int(first), int(last or first)
            if last < first:
                raise Llama3Error(f"--layers {text!r}: the range {part} runs backwards; write it {last}-{first}")
            layers.update(range(first, last + 1))
    except ValueError:
        raise Llama3Error(f"--layers takes layer numbers and ranges like 0,3,10-12, got {text!r}") from None
    bad = sorted(i for i in layers if i < 0 or (n_layers is not None and i >= n_layers))
    if bad or not layers:
        raise Llama3Error(f"--layers {text!r}: the model has layers 0 to {n_layers - 1}")
    return sorted(layers)


def trace_rows(trace: StatsTrace, layers: list[int], n_tokens: int,
               n_layers: int) -> list[tuple[str, str, str, tuple]]:
    """(stage, operation, 'in -> out' shapes, (mean, std, max abs)) for every traced stage, in model order."""
    rows = []

    def row(name, source_shape, op):
        shape, mean, std, max_abs = trace[name]
        rows.append((name, op, f"{format_shape(source_shape)} -> {format_shape(shape)}", (mean, std, max_abs)))

    row("embed", (n_tokens,), "tok_embeddings[tokens]")
    for i in layers:
        x = trace[f"layers.{i - 1}.out"][0] if i > 0 else trace["embed"][0]
        for stage, (source, op) in LAYER_FLOW.items():
            source_shape = x if source == "x" else trace[f"layers.{i}.{source}"][0]
            row(f"layers.{i}.{stage}", source_shape, op)
    row("norm", trace[f"layers.{n_layers - 1}.out"][0], "rmsnorm(out of the last layer) * norm")
    row("logits", trace["norm"][0], "norm @ output.T")
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


def add_command(sub) -> None:
    from .generate_cmd import add_model_args

    p = sub.add_parser("trace", help="walk one forward pass stage by stage: shapes and statistics",
                       description="Run one forward pass and print every named stage: the operation, "
                                   "the shape it reads and writes, and its mean, std and max |x|.")
    add_model_args(p)
    add_input_args(p, "trace")
    p.add_argument("--layers", metavar="LIST", help="only these layers, e.g. 0,1,28-29 (default: all)")
    p.set_defaults(func=run)


def run(args) -> int:
    parse_layers(args.layers, n_layers=None)  # its syntax, before the model loads
    loaded, inputs = load_with_inputs(args)
    c = loaded.config
    layers = parse_layers(args.layers, c.n_layers)
    # Every layer's output is kept (its shape is the next layer's input); other stages only for
    # the chosen layers.
    patterns = ["embed", "layers.*.out", "norm", "logits"]
    patterns += [f"layers.{i}.{stage}" for i in layers for stage in LAYER_STAGES]
    trace = StatsTrace(patterns)
    run_forward(loaded, inputs, trace)
    T, S = len(inputs.tokens), len(inputs.context) + len(inputs.tokens)
    header = (f"{loaded.checkpoint.path}: D={c.dim} H={c.n_heads} KV={c.n_kv_heads} Dh={c.head_dim} "
              f"F={c.ffn_dim} V={c.vocab_size}, {c.n_layers} layers; T={T} tokens at positions "
              f"{inputs.pos}..{inputs.pos + T - 1}, attending to S={S}")
    print(format_trace(trace_rows(trace, layers, T, c.n_layers), header))
    return 0
