#!/usr/bin/env python3
"""How close each compute mode comes to the engine it emulates, stage by stage, and how far float32
is from float64: the tables of BENCHMARKS.md, "Compute modes".

    python tools/measure_precision.py [--markdown]

On the committed fixtures of tests/fixtures/parity/ (three tiny checkpoints; cases prompt at
positions 0..15, far at 24571.., far_decode one token after far), for every low-precision engine
file (transformers bfloat16 and float16, llama-models bfloat16): per stage kind (over layers and
cases), the worst NMSE and the smallest fraction of bit-identical elements of llama3_np in the
matching mode, and the same for llama3_np in float32 mode against that file (the noise the
emulation removes). Then float32 mode against float64 mode per stage kind: llama3_np's own float32
noise floor, on those fixtures and on the default model (30 layers: the three tokens of
tests/fixtures/xcheck/default_hf.safetensors, whose transformers float32 stages are measured
against float64 too, and the first 128 tokens of jargon_hack.txt). Needs only the test dependencies
(the fixtures hold the engines' outputs) and the default model (`make test` fetches it).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

from tool_support import REPO, run_tool  # first: it makes this checkout's llama3_np importable

import numpy as np  # noqa: E402

from llama3_np.assets import default_model  # noqa: E402
from llama3_np.config import ComputeMode  # noqa: E402
from llama3_np.formats.checkpoint import load_checkpoint  # noqa: E402
from llama3_np.formats.safetensors_file import SafetensorsFile  # noqa: E402
from llama3_np.model import KVCache, forward  # noqa: E402
from llama3_np.stages import Trace  # noqa: E402
from llama3_np.load import load_tokenizer  # noqa: E402
from llama3_np.xcheck.compare import STAGE_KINDS, stage_kind  # noqa: E402

PARITY = REPO / "tests" / "fixtures" / "parity"
CONFIGS = ["llama3_0", "llama3_1", "llama3_2"]
CASES = ["prompt", "far", "far_decode"]
ENGINES = {"hf_bf16": ComputeMode("bfloat16"), "meta_bf16": ComputeMode("bfloat16", "meta"),
           "hf_fp16": ComputeMode("float16")}


def nmse(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sum((a - b) ** 2) / max(np.sum(b ** 2), 1e-300))


def read(path):
    f = SafetensorsFile(path)
    return {name: np.asarray(f.tensor(name), dtype=np.float32) for name in f.names()}, f.metadata


def run(ckpt, meta, mode) -> Trace:
    tokens, context = json.loads(meta["tokens"]), json.loads(meta["context_tokens"])
    cache = KVCache(ckpt.config, len(context) + len(tokens), mode)
    if context:
        forward(ckpt.weights, ckpt.config, context, cache, pos=int(meta["context_pos"]))
    trace = Trace()
    forward(ckpt.weights, ckpt.config, tokens, cache, pos=int(meta["pos"]), trace=trace)
    return trace


class Worst:
    """Per stage kind: the largest NMSE and the smallest fraction of equal elements."""

    def __init__(self):
        self.nmse, self.equal = defaultdict(float), defaultdict(lambda: 1.0)

    def add(self, ours: Trace, ref: dict):
        for name, x in ref.items():
            kind = stage_kind(name)
            self.nmse[kind] = max(self.nmse[kind], nmse(ours[name], x))
            self.equal[kind] = min(self.equal[kind], float(np.mean(ours[name] == x)))


XCHECK = REPO / "tests" / "fixtures" / "xcheck"


def default_model_floor() -> dict[str, Worst]:
    """On the default model, against float64 mode: float32 mode on default_hf's tokens, transformers
    float32 (that file's 57 stages), float32 mode on 128 tokens of jargon_hack.txt."""
    ckpt = load_checkpoint(default_model())  # the GGUF's exact values, in float32
    hf, meta = read(XCHECK / "default_hf.safetensors")
    text = (XCHECK / "jargon_hack.txt").read_text(encoding="utf-8")
    long_meta = {"tokens": json.dumps(load_tokenizer(default_model()).encode(text)[:128]),
                 "context_tokens": "[]", "pos": "0", "context_pos": "0"}
    out = {"llama3_np float32, 3 tokens": Worst(), "transformers float32, 3 tokens": Worst(),
           "llama3_np float32, 128 tokens": Worst()}
    float64 = run(ckpt, meta, ComputeMode("float64"))
    out["llama3_np float32, 3 tokens"].add(run(ckpt, meta, ComputeMode("float32")), dict(float64))
    out["transformers float32, 3 tokens"].add({n: hf[n] for n in hf}, {n: float64[n] for n in hf})
    out["llama3_np float32, 128 tokens"].add(run(ckpt, long_meta, ComputeMode("float32")),
                                             dict(run(ckpt, long_meta, ComputeMode("float64"))))
    return out


def main() -> int:
    markdown = "--markdown" in sys.argv[1:]
    engines = {e: (Worst(), Worst()) for e in ENGINES}
    floor = {"positions 0..15": Worst(), "positions 24571..": Worst()}
    for cfg in CONFIGS:
        ckpt = load_checkpoint(PARITY / cfg, dtype="bfloat16")
        for case in CASES:
            _, meta = read(PARITY / cfg / f"hf_{case}.safetensors")
            float32, float64 = run(ckpt, meta, ComputeMode("float32")), run(ckpt, meta, ComputeMode("float64"))
            floor["positions 0..15" if case == "prompt" else "positions 24571.."].add(float32, dict(float64))
            for engine, mode in ENGINES.items():
                ref, _ = read(PARITY / cfg / f"{engine}_{case}.safetensors")
                emulated, plain = engines[engine]
                emulated.add(run(ckpt, meta, mode), ref)
                plain.add(float32, ref)
    kinds = [k for k in STAGE_KINDS if k in floor["positions 0..15"].nmse]
    if markdown:
        head = "| stage | " + " | ".join(f"{e} mode NMSE, equal | float32 NMSE, equal" for e in ENGINES) + " |"
        print(head + "\n|---|" + "---|" * (2 * len(ENGINES)))
        for k in kinds:
            cells = []
            for e in ENGINES:
                emulated, plain = engines[e]
                cells += [f"{emulated.nmse[k]:.1e}, {100 * emulated.equal[k]:.1f}%",
                          f"{plain.nmse[k]:.1e}, {100 * plain.equal[k]:.1f}%"]
            print(f"| `{k}` | " + " | ".join(cells) + " |")
        print("\n| stage | " + " | ".join(f"float32 vs float64, {where}" for where in floor) + " |\n|---|---|---|")
        for k in kinds:
            print(f"| `{k}` | " + " | ".join(f"{w.nmse[k]:.1e}" for w in floor.values()) + " |")
        deep = default_model_floor()
        print("\n| stage | " + " | ".join(f"{where} vs float64" for where in deep) + " |\n|---|---|---|---|")
        for k in kinds:
            print(f"| `{k}` | " + " | ".join(f"{w.nmse[k]:.1e}" for w in deep.values()) + " |")
        return 0
    for e in ENGINES:
        emulated, plain = engines[e]
        print(f"\n{e}: {'stage':<11} {'mode NMSE':>10} {'equal':>7}   {'float32 NMSE':>12} {'equal':>7}")
        for k in kinds:
            print(f"{'':{len(e) + 2}}{k:<11} {emulated.nmse[k]:10.2e} {100 * emulated.equal[k]:6.1f}%   "
                  f"{plain.nmse[k]:12.2e} {100 * plain.equal[k]:6.1f}%")
    for where, w in floor.items():
        print(f"\nfloat32 vs float64, {where}: " + ", ".join(f"{k} {w.nmse[k]:.1e}" for k in kinds))
    for where, w in default_model_floor().items():
        print(f"\ndefault model, {where} vs float64: " + ", ".join(f"{k} {w.nmse[k]:.1e}" for k in kinds))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("measure_precision", main))
