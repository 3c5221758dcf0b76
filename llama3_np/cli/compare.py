"""`llama3-np compare A.safetensors B.safetensors`: where two dumps of the same forward pass part
(see `llama3_np.xcheck.compare`). Exit status 1 when a stage diverges, 0 when all agree.

`llama3-np compare A.safetensors --replay -m MODEL`: which stage of A adds the error, each stage
computed by llama3_np from A's own input to it (see `llama3_np.xcheck.replay`); exit status 1 when
a stage's local error exceeds the tolerance."""

from __future__ import annotations

import json
import math
import sys

from ..errors import Llama3Error
from ..xcheck.compare import DEFAULT_NMSE_TOL, Comparison, compare_dumps, to_json, verdict
from ..xcheck.dump import format_shape, read_dump
from ..xcheck.replay import ReplayedStage, replay
from .common import add_model_args, load


def format_table(c: Comparison, all_stages: bool = False) -> str:
    """The two files, metadata that differ, the stages past tolerance (every stage with
    `all_stages`), stages in one file only, a summary line and the verdict line."""
    lines = [f"A: {c.a} ({c.a_producer})", f"B: {c.b} ({c.b_producer}), the reference"]
    if c.metadata_differences:
        lines.append("metadata that differ (the inputs agree): " + "; ".join(
            f"{key} {va} vs {vb}" for key, (va, vb) in c.metadata_differences.items()))
    rows = c.stages if all_stages else [s for s in c.stages if s.diverged]
    if rows:
        width = max(len("stage"), *(len(s.name) for s in rows))
        shape_width = max(len("shape"), *(len(format_shape(s.shape)) for s in rows))
        lines.append(f"{'stage':<{width}}  {'shape':<{shape_width}}  {'max abs':>10}  {'max rel':>10}  "
                     f"{'NMSE':>10}  {'cosine':>12}")
        first = c.first_divergence
        for s in rows:
            mark = "  <- first divergence" if s.name == first else ("  diverges" if s.diverged else "")
            lines.append(f"{s.name:<{width}}  {format_shape(s.shape):<{shape_width}}  {s.max_abs:10.3e}  "
                         f"{s.max_rel:10.3e}  {s.nmse:10.3e}  {s.cosine:12.10f}{mark}")
    for label, names in (("only in A", c.only_in_a), ("only in B", c.only_in_b)):
        if names:
            lines.append(f"{label} ({len(names)}): {', '.join(names)}")
    worst = max(c.stages, key=lambda s: s.nmse)
    hidden = "" if len(rows) == len(c.stages) else "; --all lists every stage"
    lines.append(f"{len(c.stages)} common stages, {len(c.diverged)} past tolerance; largest NMSE "
                 f"{worst.nmse:.2e} ({worst.name}){hidden}")
    lines.append(verdict(c))
    return "\n".join(lines)


def add_command(sub) -> None:
    p = sub.add_parser("compare", help="compare two dump files stage by stage; name the first divergence",
                       description="Compare dump A against reference dump B, stage by stage in model order: "
                                   "the stages past tolerance, a summary and a one-line verdict. Exit "
                                   "status 1 when a stage diverges, 0 when all agree.")
    p.add_argument("a", metavar="A.safetensors", help="the dump to check")
    p.add_argument("b", metavar="B.safetensors", nargs="?", help="the reference dump (not with --replay)")
    p.add_argument("--tol", type=float, default=DEFAULT_NMSE_TOL, metavar="NMSE",
                   help=f"largest normalised MSE that still agrees (default {DEFAULT_NMSE_TOL:.0e}: 15x the "
                        "worst stage of llama3_np against transformers, both float32, over 31 prompts and "
                        "four sets of CPU kernels, measured by tools/calibrate_compare.py; 35x below what "
                        "Meta's rope factor 8 instead of 32 does to q_rope; about 1e-2 against a bfloat16 run)")
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


def replay_table(path: str, stages: list[ReplayedStage], tol: float, all_stages: bool = False) -> str:
    """Every stage (--all) or the 20 with the largest local error, largest first, then a verdict."""
    shown = stages if all_stages else stages[:20]
    width = max(len("stage"), *(len(r.name) for r in shown))
    in_width = max(len("input"), *(len(r.input or "tokens") for r in shown))
    lines = [f"A: {path}, each stage replayed by llama3_np on A's own input (sorted by local error)",
             f"{'stage':<{width}}  {'input':<{in_width}}  {'local NMSE':>10}  {'local max abs':>13}  "
             f"{'inherited NMSE':>14}"]
    for r in shown:
        inherited = f"{r.inherited.nmse:14.3e}" if r.inherited else f"{'-':>14}"
        mark = "  past tolerance" if r.local.diverged else ""
        lines.append(f"{r.name:<{width}}  {r.input or 'tokens':<{in_width}}  {r.local.nmse:10.3e}  "
                     f"{r.local.max_abs:13.3e}  {inherited}{mark}")
    if len(shown) < len(stages):
        lines.append(f"... {len(stages) - len(shown)} more stages (--all lists them)")
    bad = [r.name for r in stages if r.local.diverged]
    worst = stages[0]
    lines.append(f"verdict: {worst.name} adds the largest error (local NMSE {worst.local.nmse:.2e}); "
                 + (f"{len(bad)} of {len(stages)} stages add more than NMSE {tol:.0e}" if bad
                    else f"no stage adds more than NMSE {tol:.0e}"))
    return "\n".join(lines)


def replay_json(path: str, stages: list[ReplayedStage], tol: float) -> dict:
    def err(e):
        return None if e is None else {"max_abs": finite(e.max_abs), "nmse": finite(e.nmse), "diverged": e.diverged}
    return {"a": path, "nmse_tol": tol, "stages": [{"name": r.name, "input": r.input, "local": err(r.local),
                                                    "inherited": err(r.inherited)} for r in stages],
            "largest_local": stages[0].name, "past_tolerance": [r.name for r in stages if r.local.diverged]}


def finite(x: float):
    return x if math.isfinite(x) else None  # JSON has no inf or nan


def run_replay(args) -> int:
    if args.b is not None:
        raise Llama3Error("--replay compares A with llama3_np itself: give one dump file and -m MODEL, not B")
    if not (args.tol >= 0):
        raise Llama3Error(f"--tol must be a number >= 0, got {args.tol}")
    dump = read_dump(args.a)
    loaded = load(args, need_tokenizer=False)
    stages = replay(loaded.weights, loaded.config, dump, args.tol)
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
