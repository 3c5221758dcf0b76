"""`llama3-np import-gguf FILE OUT_DIR`: a GGUF file made into a checkpoint folder, explicitly.

Every command also takes `-m FILE.gguf` and imports the file once into the cache by itself
(`assets.imported_gguf`); this command is for choosing where the folder goes, for example to load
it with Hugging Face `transformers` too.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import Llama3Error
from ..files import WriteError
from .common import ProgressLine


def add_command(sub) -> None:
    p = sub.add_parser("import-gguf", help="import a GGUF file into a checkpoint folder (needs the gguf extra)",
                       description="Import a Llama-architecture GGUF file into a Hugging Face checkpoint folder "
                                   "(config.json, model.safetensors in bf16, tokenizer.json), which llama3_np and "
                                   "transformers load. Needs the gguf package: pip install 'llama3_np[gguf]'.")
    p.add_argument("gguf", metavar="FILE", help="a Llama-architecture .gguf file")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the checkpoint folder to create")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..formats.gguf_import import import_gguf, is_nonempty_folder

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
