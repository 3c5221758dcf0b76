"""`llama3-np import-gguf FILE OUT_DIR`: a GGUF file written as a Hugging Face checkpoint folder of its
exact values, for example to load it with `transformers` too. Every command reads `-m FILE.gguf`
itself (`formats.gguf_import`); this one makes a second copy only because it is asked to.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import Llama3Error
from ..files import WriteError
from .common import ProgressLine


def add_command(sub) -> None:
    p = sub.add_parser("import-gguf", help="write a GGUF file's exact values as a Hugging Face checkpoint folder",
                       description="Write a Llama-architecture GGUF file as a Hugging Face checkpoint folder "
                                   "(config.json, model.safetensors with the exact dequantized values in float32, "
                                   "bf16 where they are all bfloat16 numbers, tokenizer.json), which llama3_np and "
                                   "transformers load. llama3_np reads -m FILE.gguf without it.")
    p.add_argument("gguf", metavar="FILE", help="a Llama-architecture .gguf file")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the checkpoint folder to create")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..formats.gguf_to_hf import import_gguf, is_nonempty_folder

    if is_nonempty_folder(Path(args.out_dir)) and not args.force:
        raise Llama3Error(f"{args.out_dir}: exists and is not empty; pass --force to replace it")
    progress = ProgressLine("importing", "tensors")
    try:
        out = import_gguf(args.gguf, args.out_dir, args.force, progress=progress.update)
    except WriteError as e:
        raise e.advise("name an OUT_DIR where you can write") from None
    finally:
        progress.clear()
    print(f"imported {args.gguf} into {out}")
    return 0
