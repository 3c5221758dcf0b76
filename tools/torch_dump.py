"""A dump file (docs/DESIGN.md's format, the one `llama3-np dump` writes) from a torch reference:

    python tools/torch_dump.py -m DIR (-p TEXT | -f FILE | --tokens 1,2,3 | --like DUMP) -o OUT.safetensors
                               [--producer hf|meta] [--dtype float32|bfloat16|float16] [--pos N] [--stages GLOB ...]

  hf    Hugging Face transformers' LlamaForCausalLM (eager attention)
  meta  Meta's reference Transformer from llama-models (rope factor taken from the config: Meta's
        code hard-codes 8, which is wrong for Llama 3.2 1B/3B; see tests/fixtures/parity/README.md)

DIR is a Hugging Face checkpoint folder (config.json, model*.safetensors): the format both references
load. q/k stages are converted to Meta's interleaved rope layout, as in every dump. Text is tokenized
by llama3_np's tokenizer, so that both sides of a comparison run the same ids; `--like DUMP` runs the
tokens, positions and KV-cache context of an existing dump (for example one from `llama3-np dump`).

Then: `llama3-np compare ours.safetensors OUT.safetensors`. The stage recording itself is
tools/torch_reference.py. Needs the tools extra (`make tools`).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
from pathlib import Path

from tool_support import REPO, run_tool  # noqa: F401  (puts this checkout's llama3_np on sys.path)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from llama3_np.config import from_hf_config  # noqa: E402
from llama3_np.cli.common import parse_token_ids, read_prompt  # noqa: E402
from llama3_np.stages import check_globs, stage_shapes  # noqa: E402
from llama3_np.xcheck.dump import Inputs, dump_metadata, resolve_inputs, write_dump  # noqa: E402
from llama3_np.errors import Llama3Error  # noqa: E402
from llama3_np.load import load_tokenizer  # noqa: E402

META_SHIPPED_FACTOR = 8.0  # the literal in llama-models' apply_scaling


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", required=True, metavar="DIR", help="Hugging Face checkpoint folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--prompt", help="text (tokenized by llama3_np's tokenizer)")
    src.add_argument("-f", "--file", help="read the text from a UTF-8 file")
    src.add_argument("--tokens", help="comma-separated token ids")
    src.add_argument("--like", metavar="DUMP", help="run the tokens, positions and context of this dump file")
    p.add_argument("--pos", type=int, metavar="N", help="rope position of the first token (default 0)")
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    p.add_argument("--producer", choices=["hf", "meta"], default="hf")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="what the reference computes in (stages are stored as float32 either way)")
    p.add_argument("--stages", nargs="+", metavar="GLOB", help="keep only stages matching these globs")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch threads (default 1: the same file, byte for byte, on every run)")
    return p.parse_args(argv)


def hf_stages(checkpoint: Path, inputs: Inputs, dtype) -> tuple[dict, dict]:
    import torch_reference as ref
    model = ref.load_hf(checkpoint, dtype)
    cache = ref.hf_new_cache(model) if inputs.context else None
    if inputs.context:
        ref.hf_run(model, inputs.context, inputs.context_pos, cache)
    stages = ref.hf_run(model, inputs.tokens, inputs.pos, cache)
    producer = f"transformers {ref.transformers_module().__version__}"
    return stages, {"producer": producer, "attn_implementation": model.config._attn_implementation}


def meta_stages(checkpoint: Path, inputs: Inputs, config, dtype) -> tuple[dict, dict]:
    import torch_reference as ref
    factor = config.rope_scaling.factor if config.rope_scaling is not None else None
    patch = None if factor in (None, META_SHIPPED_FACTOR) else factor
    # Meta's KV cache holds max_seq_len slots and its rope table 2 * max_seq_len rows.
    n = len(inputs.context) + len(inputs.tokens)
    max_seq_len = max(n, (inputs.pos + len(inputs.tokens)) // 2 + 1)
    model = ref.load_meta(checkpoint, max_seq_len, dtype, rope_factor=patch)
    if inputs.context:
        ref.meta_run(model, inputs.context, inputs.context_pos, cache_pos=0)
    stages = ref.meta_run(model, inputs.tokens, inputs.pos, cache_pos=len(inputs.context))
    producer = f"llama-models {ref.package_version('llama_models')}"
    if patch is not None:
        producer += f", apply_scaling factor {META_SHIPPED_FACTOR:g} patched to {patch:g}"
    return stages, {"producer": producer,
                    "rope_factor_used": "none" if factor is None else f"{factor:g}"}


def main(argv=None) -> int:
    args = parse_args(argv)
    checkpoint = Path(args.model)
    if not (checkpoint / "config.json").is_file():
        raise Llama3Error(f"{checkpoint}: no config.json; pass a Hugging Face checkpoint folder")
    output = Path(args.output)
    if not output.resolve().parent.is_dir():
        raise Llama3Error(f"-o {args.output}: folder {output.parent} does not exist")
    config = from_hf_config(json.loads((checkpoint / "config.json").read_text()))
    # The command line's own readers of -f and --tokens, and the library's of the rest: `llama3-np dump` reads them so.
    tokens = parse_token_ids(args.tokens, config.vocab_size) if args.tokens is not None else None
    inputs = resolve_inputs(config, text=read_prompt(args), tokens=tokens, like=args.like, pos=args.pos,
                            encode=lambda text: load_tokenizer(checkpoint).encode(text), model=checkpoint)
    for note in inputs.notes:
        print(f"note: {note}", file=sys.stderr)
    names = stage_shapes(config, len(inputs.tokens), probs=False)  # the references record no probs
    globs = check_globs(args.stages, names) if args.stages is not None else ["*"]

    try:
        import torch
        import torch_reference as ref
    except ImportError as e:  # a run-time install has none of the references
        raise Llama3Error(f"the reference implementations are not installed ({e.name} is missing): "
                          "run `make tools` and use .venv/bin/python") from None
    ref.deterministic_torch(args.threads)
    ref.transformers_module().utils.logging.disable_progress_bar()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if args.producer == "hf":
        stages, extra = hf_stages(checkpoint, inputs, dtype)
    else:
        stages, extra = meta_stages(checkpoint, inputs, config, dtype)
    extra["producer"] += f" {args.dtype}"
    stages = {k: v for k, v in stages.items() if any(fnmatch.fnmatchcase(k, g) for g in globs)}
    metadata = dump_metadata(config, inputs, args.dtype, format="hf", torch=torch.__version__, **extra)
    write_dump(output, stages, metadata)
    print(f"wrote {len(stages)} stages of {len(inputs.tokens)} tokens from {extra['producer']} to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("torch_dump", main, OSError))
