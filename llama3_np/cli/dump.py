"""`llama3-np dump`: every named stage of one forward pass, written as a dump file
(`llama3_np.xcheck.dump`; the format is docs/DESIGN.md's)."""

from __future__ import annotations

import json
from pathlib import Path

from ..backward import IGNORE_INDEX, loss_and_gradients
from ..errors import Llama3Error
from ..files import WriteError, check_can_write
from ..stages import Trace, check_globs, stage_shapes
from ..xcheck.dump import convention_metadata, dump_metadata, read_dump, run_forward, write_dump
from .common import add_input_args, add_model_args, load_with_inputs


def add_command(sub) -> None:
    p = sub.add_parser("dump", help="write every named stage of one forward pass to a dump file",
                       description="Run one forward pass and write its named stages (docs/DESIGN.md's dump "
                                   "format: float32 safetensors, metadata with the config and tokens).")
    add_model_args(p)
    add_input_args(p, "run")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="dump file to write (.safetensors)")
    p.add_argument("--stages", nargs="+", metavar="GLOB",
                   help="keep only stages matching these globs (default: every stage, or those of --like); "
                        "attention probabilities layers.N.probs [H, T, S] only when a glob other than '*' "
                        "matches them, e.g. --stages '*' 'layers.0.probs'")
    p.add_argument("--grad", action="store_true",
                   help="write the gradient of each stage, dL/dstage, of the mean next-token cross-entropy of "
                        "the tokens (the last one predicts nothing) instead of the stage; the metadata holds the "
                        "targets and the loss. Compare it with another implementation's gradient dump")
    p.set_defaults(func=run)


def run(args) -> int:
    output = Path(args.output)
    if output.suffix != ".safetensors":
        raise Llama3Error(f"-o {args.output}: a dump is a safetensors file; name it FILE.safetensors")
    try:
        check_can_write(output)
    except WriteError as e:
        raise Llama3Error(f"-o: {e}") from None
    loaded, inputs = load_with_inputs(args)
    names = stage_shapes(loaded.config, len(inputs.tokens), len(inputs.context))
    if args.stages is not None:
        globs = check_globs(args.stages, names)
    elif args.like is not None:
        globs = read_dump(args.like).names
    else:
        globs = ["*"]
    trace = Trace(globs)
    extra = convention_metadata(loaded.compute)
    if args.grad:
        if loaded.compute.dtype != "float32":
            raise Llama3Error("--grad: the gradient is computed in float32; leave out --compute")
        if inputs.context:
            raise Llama3Error("--grad: the gradient is of one pass over the tokens from their position, "
                              "without a KV-cache context; dump the context and the tokens together")
        targets = list(inputs.tokens[1:]) + [IGNORE_INDEX]
        loss, _ = loss_and_gradients(loaded.weights, loaded.config, inputs.tokens, targets, inputs.pos, trace=trace)
        extra = {"targets": json.dumps(targets), "loss": repr(loss)}
    else:
        run_forward(loaded.weights, loaded.config, inputs, trace, loaded.compute)
    write_dump(output, dict(trace), dump_metadata(loaded.config, inputs, loaded.compute.dtype,
                                                  residency=loaded.checkpoint.dtype,
                                                  format=loaded.checkpoint.format, **extra))
    size = output.stat().st_size
    print(f"wrote {len(trace)} stages of {len(inputs.tokens)} tokens ({size / 1e6:.1f} MB) to {output}")
    return 0
