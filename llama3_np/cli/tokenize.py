"""`llama3-np tokenize`: the token ids of a text and the piece of text each one stands for.

Like llama.cpp's `llama-tokenize`: one `id -> 'piece'` line per token, the checkpoint's BOS first
when it adds one (`--no-bos` leaves it out). With `--json`, one object: `ids`, and `pieces` with
each token's readable text and its bytes in hex (which concatenate to the text's UTF-8).
"""

from __future__ import annotations

import json
import sys

from ..errors import Llama3Error
from ..load import load_tokenizer
from ..text.pieces import format_pieces, pieces
from .common import model_dir, read_prompt


def add_command(sub) -> None:
    p = sub.add_parser("tokenize", help="show the token ids of a text and the piece each one stands for",
                       description="Print the token ids of a text and the piece of text each one stands for, "
                                   "as llama.cpp's llama-tokenize does.")
    p.add_argument("-m", "--model", metavar="DIR",
                   help="checkpoint folder or .gguf file whose tokenizer to use; default: the default model")
    src = p.add_mutually_exclusive_group()
    src.add_argument("-p", "--prompt", help="the text")
    src.add_argument("-f", "--file", help="read the text from a UTF-8 file (- for standard input)")
    p.add_argument("--no-bos", action="store_true", help="do not add the BOS token the checkpoint adds")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of one line per token")
    p.set_defaults(func=run)


def run(args) -> int:
    text = read_prompt(args, verbatim=True)  # as llama-tokenize: a final newline is a token too
    if text is None:
        raise Llama3Error("give a text: -p TEXT or -f FILE")
    tok = load_tokenizer(model_dir(args.model))
    ids = tok.encode(text, bos=False if args.no_bos else None)
    items = pieces(tok, ids)
    if args.json:
        out = json.dumps({"ids": ids, "pieces": [p.to_json() for p in items]}, ensure_ascii=False)
    else:
        out = format_pieces(items)
    sys.stdout.write(out + "\n")
    return 0
