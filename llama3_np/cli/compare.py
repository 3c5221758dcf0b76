"""`llama3-np compare A.safetensors B.safetensors`: where two dumps of the same forward pass part
(see `llama3_np.xcheck.compare`). Exit status 1 when a stage diverges, 0 when all agree."""

from __future__ import annotations

import json
import sys

from ..xcheck.compare import DEFAULT_NMSE_TOL, Comparison, compare_dumps, to_json, verdict
from ..xcheck.dump import format_shape


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
