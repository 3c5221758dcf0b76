"""`llama3-np walkthrough`: one forward pass of a prompt as a self-contained HTML page.

The page (see `llama3_np.walkthrough`) follows the data path with equations, the source of the
functions that compute each step, the shapes and pictures. It needs matplotlib, the `viz` extra.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import Llama3Error
from ..files import AtomicFile, WriteError
from ..stages import Trace
from ..xcheck.dump import run_forward
from ..xcheck.trace import parse_layers
from .common import add_input_args, add_model_args, load_with_inputs


def add_command(sub) -> None:
    p = sub.add_parser("walkthrough", help="one forward pass as an HTML page: equations, code, shapes, pictures",
                       description="Run one forward pass and write a self-contained HTML page that follows "
                                   "the data path: tokens, configuration, embedding and RMSNorm, RoPE, "
                                   "attention maps, SwiGLU, the residual stream, the logits and a logit lens. "
                                   "Needs matplotlib: pip install 'llama3_np[viz]'.")
    add_model_args(p)
    add_input_args(p, "walk through")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="HTML file to write")
    p.add_argument("--layers", metavar="LIST",
                   help="layers whose attention and SwiGLU are drawn, e.g. 0,3,10-12 or all "
                        "(default: the first and the last)")
    p.add_argument("--heads", metavar="LIST",
                   help="query heads whose attention maps are drawn, e.g. 0,2-4 or all "
                        "(default: the heads that share the first key/value head)")
    p.set_defaults(func=run)


def parse_list(text: str | None, n: int, default: list[int], flag: str, what: str) -> list[int]:
    """'all', or numbers and ranges like 0,3,10-12 below n; None -> `default`."""
    if text is None:
        return default
    try:
        return parse_layers(None if text.strip() == "all" else text, n)
    except Llama3Error:
        raise Llama3Error(f"{flag} takes {what} numbers and ranges like 0,2-4, or all; the model has "
                          f"{what}s 0 to {n - 1}, got {text!r}") from None


def run(args) -> int:
    from ..xcheck.walkthrough import require_viz, trace_patterns, walkthrough_page

    require_viz()  # before the model loads: a missing extra is the first thing to say
    try:
        output = AtomicFile(args.output, "w")  # a folder that cannot be written is said before the work
    except WriteError as e:
        raise Llama3Error(f"-o: {e}") from None
    try:
        loaded, inputs = load_with_inputs(args)
        c = loaded.config
        layers = parse_list(args.layers, c.n_layers, sorted({0, c.n_layers - 1}), "--layers", "layer")
        heads = parse_list(args.heads, c.n_heads, list(range(c.n_rep)), "--heads", "query head")
        trace = Trace(trace_patterns(layers))
        run_forward(loaded.weights, loaded.config, inputs, trace, loaded.compute)
        page = walkthrough_page(loaded.checkpoint.weights, c, trace, inputs.tokens, layers=layers, heads=heads,
                                pos=inputs.pos, context=inputs.context, tokenizer=loaded.tokenizer,
                                model_name=str(loaded.checkpoint.path))
        output.write(page)
        output.commit()
    finally:
        output.discard()
    size = Path(args.output).stat().st_size
    print(f"wrote {args.output} ({size / 1e6:.1f} MB): {len(inputs.tokens)} tokens, "
          f"attention of {len(layers)} layers x {len(heads)} heads")
    return 0
