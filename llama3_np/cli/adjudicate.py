"""`llama3-np adjudicate A B`: where two engines' continuations of a prompt part, a near-tie inside
the rounding noise of their declared precisions or a defect (see `llama3_np.xcheck.adjudicate`).
Exit status 0 when they agree or part at a near-tie, 1 at a defect, 2 on bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..config import COMPUTE_DTYPES
from ..errors import Llama3Error
from ..files import read_json
from ..xcheck.adjudicate import CONTINUATION_FORMATS, adjudicate, prompt_and_continuations, ruling_report
from ..xcheck.dump import read_dump
from .common import add_model_args, add_prompt_args, load, parse_token_ids, read_prompt


def add_command(sub) -> None:
    p = sub.add_parser("adjudicate", help="rule on two continuations that part: near-tie or defect",
                       description="Find where two engines' continuations of a prompt part, replay the common prefix "
                                   "in float64 and in each engine's declared compute mode, and rule: a near-tie "
                                   "(the float64 margin between the two candidates inside the noise band of those "
                                   "modes) or a defect. Exit status 0 when they agree or part at a near-tie, 1 at a "
                                   "defect, 2 on bad input.")
    add_model_args(p)
    add_prompt_args(p, "the prompt the continuations follow")
    formats = "; ".join(f"{k}: {v}" for k, v in CONTINUATION_FORMATS.items())
    for side in ("a", "b"):
        p.add_argument(side, metavar=side.upper(),
                       help=f"engine {side.upper()}'s continuation: comma-separated ids, or a JSON file ({formats}); "
                            "the prompt may come from the file instead of -p/--tokens")
    for side in ("a", "b"):
        p.add_argument(f"--compute-{side}", choices=COMPUTE_DTYPES, metavar="MODE",
                       help=f"the precision engine {side.upper()} computes in ({', '.join(COMPUTE_DTYPES)}; "
                            "default: --compute's, which also says how the weights are held)")
    for side in ("a", "b"):
        p.add_argument(f"--dump-{side}", metavar="FILE",
                       help=f"engine {side.upper()}'s dump of the common prefix (prompt and shared tokens, from "
                            "position 0): say where its error enters, by compare --replay in the mode it declares")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def parse_continuation(arg: str, side: str):
    """Comma-separated ids as a list, or the JSON value of the file `arg` names."""
    if re.fullmatch(r"[\d,\s]*", arg):
        return [int(t) for t in arg.replace(" ", "").split(",") if t]
    if not Path(arg).is_file():
        raise Llama3Error(f"{side} {arg!r} is neither comma-separated token ids nor a JSON file")
    return read_json(arg, f"{side} file", "give a JSON file or comma-separated ids")


def run(args) -> int:
    values = [parse_continuation(args.a, "A"), parse_continuation(args.b, "B")]
    text = read_prompt(args)
    if text == "":
        raise Llama3Error("the prompt is empty: give the prompt the continuations follow")
    loaded = load(args, need_tokenizer=text is not None)
    tok, config = loaded.tokenizer, loaded.config
    given = tok.encode(text) if text is not None else (parse_token_ids(args.tokens, config.vocab_size)
                                                     if args.tokens is not None else None)
    prompt, a, b = prompt_and_continuations(values, given)
    dumps = {side: read_dump(path) for side, path in (("A", args.dump_a), ("B", args.dump_b)) if path is not None}
    ruling = adjudicate(loaded.weights, config, prompt, a, b, args.compute_a or args.compute,
                        args.compute_b or args.compute, dumps)
    if args.json:
        print(json.dumps(ruling.to_json()))
    else:
        shown = {i for i, _ in ruling.top} | {i for i in (ruling.a, ruling.b) if i is not None}
        names = {i: (tok.decode([i]) if tok is not None else f"<{i}>") for i in shown}
        print(ruling_report(ruling, names))
    return 1 if ruling.verdict == "defect" else 0
