"""`llama3-np bench`: load, prefill and decode speed against this machine's own limits (see
`llama3_np.xcheck.bench`)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from ..xcheck.bench import bench, report
from .common import ProgressLine, add_model_args, model_dir


def add_command(sub) -> None:
    b = sub.add_parser("bench", help="measure load, prefill and decode speed against this machine's limits",
                       description="Measure load time, prefill and decode speed and peak memory, each speed as a "
                                   "fraction of this machine's read bandwidth and sgemm rate, measured in the same "
                                   "process.")
    add_model_args(b)
    b.add_argument("--prompt", type=int, default=512, metavar="N", help="prompt tokens (default %(default)s)")
    b.add_argument("--new", type=int, default=128, metavar="N", help="tokens to generate (default %(default)s)")
    b.add_argument("--runs", type=int, default=3, metavar="N",
                   help="timed runs after the warm-up (default %(default)s)")
    b.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    b.set_defaults(func=run)


def run(args) -> int:
    progress = ProgressLine("bench", "steps")  # about half a minute on the default model
    try:
        result = bench(model_dir(args.model), args.dtype, args.prompt, args.new, args.runs, args.rope_factor,
                       progress.update, args.compute, args.convention)
    finally:
        progress.clear()
    if args.json:
        sys.stdout.write(json.dumps(asdict(result)) + "\n")
    else:
        print(report(result))
    return 0
