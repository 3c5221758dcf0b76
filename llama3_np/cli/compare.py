"""`llama3-np compare A.safetensors B.safetensors`: where two dumps of the same forward pass part
(see `llama3_np.xcheck.compare`). Exit status 1 when a stage diverges, 0 when all agree."""

from __future__ import annotations

import json
import sys

from ..xcheck.compare import DEFAULT_NMSE_TOL, compare_dumps, format_table, to_json


def add_command(sub) -> None:
    p = sub.add_parser("compare", help="compare two dump files stage by stage; name the first divergence",
                       description="Compare dump A against reference dump B, stage by stage in model order: "
                                   "the stages past tolerance, a summary and a one-line verdict. Exit "
                                   "status 1 when a stage diverges, 0 when all agree.")
    p.add_argument("a", metavar="A.safetensors", help="the dump to check")
    p.add_argument("b", metavar="B.safetensors", help="the reference dump")
    p.add_argument("--tol", type=float, default=DEFAULT_NMSE_TOL, metavar="NMSE",
                   help=f"largest normalised MSE that still agrees (default {DEFAULT_NMSE_TOL:.0e}: 15x the "
                        "worst stage of llama3_np against transformers, both float32, over 31 prompts and "
                        "four sets of CPU kernels, measured by tools/calibrate_compare.py; 35x below what "
                        "Meta's rope factor 8 instead of 32 does to q_rope; about 1e-2 against a bfloat16 run)")
    p.add_argument("--rel-tol", type=float, metavar="R",
                   help="also require max |a - b| / max |b| <= R in every stage")
    p.add_argument("--all", action="store_true", help="list every common stage, not only those past tolerance")
    p.add_argument("--json", action="store_true", help="print one JSON object, every stage included")
    p.set_defaults(func=run)


def run(args) -> int:
    c = compare_dumps(args.a, args.b, args.tol, args.rel_tol)
    if args.json:
        sys.stdout.write(json.dumps(to_json(c)) + "\n")
    else:
        print(format_table(c, all_stages=args.all))
    return 1 if c.diverged else 0
