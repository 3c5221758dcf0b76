"""`llama3-np trace`: one forward pass walked stage by stage (see `llama3_np.xcheck.trace`)."""

from __future__ import annotations

from ..stages import LAYER_STAGES
from ..xcheck.dump import run_forward
from ..xcheck.trace import StatsTrace, format_trace, parse_layers, trace_rows
from .common import add_input_args, add_model_args, load_with_inputs


def add_command(sub) -> None:
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
    run_forward(loaded.weights, loaded.config, inputs, trace, loaded.compute)
    T, S = len(inputs.tokens), len(inputs.context) + len(inputs.tokens)
    header = (f"{loaded.checkpoint.path}: D={c.dim} H={c.n_heads} KV={c.n_kv_heads} Dh={c.head_dim} "
              f"F={c.ffn_dim} V={c.vocab_size}, {c.n_layers} layers; T={T} tokens at positions "
              f"{inputs.pos}..{inputs.pos + T - 1}, attending to S={S}")
    print(format_trace(trace_rows(trace, layers, T, c.n_layers), header))
    return 0
