"""`llama3-np inspect -m DIR`: what a checkpoint folder or GGUF file holds, checked, without reading its weights.

The facts and their text are the library's (`llama3_np.summary`); this command prints them.
"""

from __future__ import annotations

import json

from ..formats.checkpoint import scan_checkpoint
from ..summary import summarize, summary_text
from .common import model_dir


def add_command(subparsers):
    p = subparsers.add_parser("inspect", help="describe and validate a checkpoint folder without loading it",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", metavar="DIR",
                   help="checkpoint folder (Hugging Face or Meta format) or .gguf file; default: the default model")
    p.add_argument("--rope-factor", type=float, metavar="F",
                   help="Meta checkpoints: override the rope scaling factor use_scaled_rope implies")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def run(args) -> int:
    index = scan_checkpoint(model_dir(args.model), rope_factor=args.rope_factor)
    summary = summarize(index)
    print(json.dumps(summary, indent=2) if args.json else summary_text(summary))
    return 0
