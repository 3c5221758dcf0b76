"""`llama3-np compare A.safetensors B.safetensors`: where two dumps of the same forward pass part
(see `llama3_np.xcheck.compare`). Exit status 1 when a stage diverges, 0 when all agree.

`llama3-np compare A.safetensors --replay -m MODEL`: which stage of A adds the error, each stage
computed by llama3_np from A's own input to it (see `llama3_np.xcheck.replay`); exit status 1 when
a stage's local error exceeds the tolerance."""

from __future__ import annotations

import json
import sys

from ..errors import Llama3Error
from ..xcheck.compare import DEFAULT_NMSE_TOL, compare_dumps, format_table, to_json
from ..xcheck.dump import read_dump
from ..xcheck.replay import replay, replay_json, replay_table
from .common import add_model_args, load


def add_command(sub) -> None:
    p = sub.add_parser("compare", help="compare two dump files stage by stage; name the first divergence",
                       description="Compare dump A against reference dump B, stage by stage in model order: "
                                   "the stages past tolerance, a summary and a one-line verdict. Exit "
                                   "status 1 when a stage diverges, 0 when all agree.")
    p.add_argument("a", metavar="A.safetensors", help="the dump to check")
    p.add_argument("b", metavar="B.safetensors", nargs="?", help="the reference dump (not with --replay)")
    p.add_argument("--tol", type=float, metavar="NMSE",
                   help=f"largest normalised MSE that still agrees, at every stage (default {DEFAULT_NMSE_TOL:.0e}, "
                        "measured between float32 rounding noise and the smallest known fault; when either dump "
                        "was computed in bfloat16 or float16, that precision's measured default per stage kind: "
                        "see docs/DESIGN.md)")
    p.add_argument("--rel-tol", type=float, metavar="R",
                   help="also require max |a - b| / max |b| <= R in every stage")
    p.add_argument("--all", action="store_true", help="list every common stage, not only those past tolerance")
    p.add_argument("--json", action="store_true", help="print one JSON object, every stage included")
    p.add_argument("--replay", action="store_true",
                   help="with -m MODEL: compute every stage of A with llama3_np from A's own input to it and report "
                        "the error each stage adds (local) and the error it was handed (inherited), sorted by local "
                        "error; exit 1 when a local error exceeds --tol")
    add_model_args(p)
    p.set_defaults(func=run)


def run_replay(args) -> int:
    if args.b is not None:
        raise Llama3Error("--replay compares A with llama3_np itself: give one dump file and -m MODEL, not B")
    if args.tol is None:
        args.tol = DEFAULT_NMSE_TOL
    if not (args.tol >= 0):
        raise Llama3Error(f"--tol must be a number >= 0, got {args.tol}")
    dump = read_dump(args.a)
    loaded = load(args, need_tokenizer=False)
    stages = replay(loaded.weights, loaded.config, dump, args.tol, loaded.compute)
    if args.json:
        sys.stdout.write(json.dumps(replay_json(args.a, stages, args.tol)) + "\n")
    else:
        print(replay_table(args.a, stages, args.tol, args.all))
    return 1 if any(r.local.diverged for r in stages) else 0


def run(args) -> int:
    if args.replay:
        return run_replay(args)
    if args.b is None:
        raise Llama3Error("give the reference dump B (or --replay -m MODEL to have llama3_np replay A)")
    if args.model is not None:
        raise Llama3Error("-m goes with --replay; two dumps are compared without a model")
    c = compare_dumps(args.a, args.b, args.tol, args.rel_tol)
    if args.json:
        sys.stdout.write(json.dumps(to_json(c)) + "\n")
    else:
        print(format_table(c, all_stages=args.all))
    return 1 if c.diverged else 0
