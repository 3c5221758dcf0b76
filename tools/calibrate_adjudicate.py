#!/usr/bin/env python3
"""Calibrate adjudicate's noise band, and write the float32 continuations of the honest engine it is
tested on: tests/fixtures/adjudicate/calibration.json and honest.json.

    python tools/fetch_default_model.py && python tools/calibrate_adjudicate.py

(needs `make tools`: torch, transformers). The honest engine is transformers' `LlamaForCausalLM` on
the default model's exact values (its Q4_1 GGUF imported by `gguf_to_hf.import_gguf` into a
temporary Hugging Face folder, float32, which each engine rounds to its dtype as it loads them, as
`make_precision_reference.py` does), eager attention, one thread, on the 20 prompts of
tests/fixtures/default_model/greedy_low_precision.json, whose bfloat16 continuations (64 greedy
tokens, `make_precision_reference.py`) it holds. This tool:

- finds where transformers in float32 would continue otherwise: prompt + bfloat16 continuation
  teacher-forced in float32, its argmax (the first of equal logits, as greedy picks) at every
  position. Up to the first position where that argmax is not the bfloat16 token, the float32
  greedy continuation is the bfloat16 one (same prefix, same choice), and there it takes the argmax
  instead: honest.json keeps that float32 continuation up to and with the parting token (all that
  a ruling reads), and where it parts. At each parting `adjudicate` must rule a near-tie
  (tests/xcheck/test_adjudicate.py).
- teacher-forces prompt + the first CALIBRATED tokens of the bfloat16 continuation through
  transformers in bfloat16 and in float32 and through llama3_np in float64 and in the same two
  modes. At every position that chose a token, for the float64 top candidate t and each other of
  the TOP_N most probable j, the honest engine's margin error
  |(z_E[t] - z_E[j]) - (z64[t] - z64[j])| is divided by the margin noise sigma that llama3_np's
  mode of the same dtype shows there (`adjudicate.margin_noise`). NOISE_K is the largest ratio over
  both modes, times 1.5, rounded up to a whole number.

calibration.json keeps, per mode, the number of margins measured, the ratio's median, 99th
percentile and largest with where it was, the sigma's median, and NOISE_K;
llama3_np/xcheck/adjudicate.py holds the constant and tests/xcheck/test_adjudicate.py checks the two
agree. The tool prints the ruling at every parting of the bfloat16 continuation.
"""

from __future__ import annotations

import json
import math
import sys
from importlib import metadata
from pathlib import Path

from tool_support import REPO, compact_number_lists, run_tool  # first: it makes this checkout's llama3_np importable

import numpy as np  # noqa: E402
import torch  # noqa: E402

import torch_reference as ref  # noqa: E402
from llama3_np.load import load_model  # noqa: E402
from llama3_np.model import forward  # noqa: E402
from llama3_np.xcheck import adjudicate as adj  # noqa: E402

OUT = REPO / "tests" / "fixtures" / "adjudicate"
LOW_PRECISION = REPO / "tests" / "fixtures" / "default_model" / "greedy_low_precision.json"
MODES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
CALIBRATED = 32  # continuation tokens whose positions calibrate the band, per prompt


def teacher_forced(model, ids: list[int]) -> np.ndarray:  # -> [T, V] float64
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double().numpy()


def main() -> int:
    with ref.default_model_folder() as folder:
        return calibrate(folder)


def calibrate(folder: Path) -> int:
    ref.deterministic_torch()
    loaded = load_model(folder)
    w, c = loaded.weights, loaded.config
    low = json.loads(LOW_PRECISION.read_text())
    bf16 = {case["name"]: case["ids"] for case in low["producers"]["hf_bf16"]["cases"]}
    engines = {name: ref.load_hf(folder, dtype) for name, dtype in MODES.items()}
    honest = []
    ratios = {m: [] for m in MODES}
    sigmas = {m: [] for m in MODES}
    largest = {m: (0.0, None) for m in MODES}
    for n, prompt in enumerate(low["prompts"]):
        n_prompt, ids16 = len(prompt["prompt_ids"]), bf16[prompt["name"]]
        z32 = teacher_forced(engines["float32"], prompt["prompt_ids"] + ids16)
        choices = [int(np.argmax(z32[n_prompt - 1 + i])) for i in range(len(ids16))]
        part = adj.first_divergence(choices, ids16)
        ids32 = ids16 if part is None else ids16[:part] + [choices[part]]
        honest.append({"name": prompt["name"], "float32": ids32, "parts_at": part})
        ids = prompt["prompt_ids"] + ids16[:CALIBRATED]
        rows = range(n_prompt - 1, len(ids) - 1)  # the positions that chose the continuation
        z64 = forward(w, c, ids, compute="float64")
        for mode, model in engines.items():
            ours = forward(w, c, ids, compute=mode).astype(np.float64)
            theirs = z32[:len(ids)] if mode == "float32" else teacher_forced(model, ids)
            for r in rows:
                sigma = adj.margin_noise(z64[r], ours[r])
                sigmas[mode].append(sigma)
                top = np.argsort(-z64[r], kind="stable")[:adj.TOP_N]
                t = top[0]
                for j in top[1:]:
                    error = abs((theirs[r, t] - theirs[r, j]) - (z64[r, t] - z64[r, j]))
                    ratio = error / sigma if sigma > 0 else math.inf
                    ratios[mode].append(ratio)
                    if ratio > largest[mode][0]:
                        largest[mode] = (ratio, {"prompt": prompt["name"], "position": r, "candidates": [int(t), int(j)],
                                                 "error": error, "sigma": sigma})
        print(f"{n:>2} {prompt['name']}: transformers float32 and bfloat16 greedy part at {part}", flush=True)
    summary = {m: {"margins": len(r), "median_ratio": float(np.median(r)), "p99_ratio": float(np.percentile(r, 99)),
                   "max_ratio": float(np.max(r)), "median_sigma": float(np.median(sigmas[m])),
                   "largest": largest[m][1]} for m, r in ratios.items()}
    noise_k = math.ceil(1.5 * max(s["max_ratio"] for s in summary.values()))
    for m, s in summary.items():
        print(f"{m}: {s['margins']} margins, error/sigma median {s['median_ratio']:.2f}, p99 {s['p99_ratio']:.2f}, "
              f"max {s['max_ratio']:.2f}; sigma median {s['median_sigma']:.3g}")
    print(f"NOISE_K = {noise_k}")
    OUT.mkdir(parents=True, exist_ok=True)
    producer = {"tool": "tools/calibrate_adjudicate.py", "transformers": metadata.version("transformers"),
                "torch": metadata.version("torch"), "top_n": adj.TOP_N, "calibrated_tokens": CALIBRATED,
                "bfloat16": "tests/fixtures/default_model/greedy_low_precision.json hf_bf16"}
    (OUT / "calibration.json").write_text(json.dumps({"producer": producer, "noise_k": noise_k, "modes": summary},
                                                     indent=1) + "\n")
    text = json.dumps({"producer": producer, "cases": honest}, indent=1, ensure_ascii=False)
    text = compact_number_lists(text)
    (OUT / "honest.json").write_text(text + "\n")
    if noise_k != adj.NOISE_K:
        print(f"set NOISE_K = {noise_k} in llama3_np/xcheck/adjudicate.py, then run this tool again for the rulings")
        return 0
    for prompt, case in zip(low["prompts"], honest):
        if case["parts_at"] is not None:
            r = adj.adjudicate(w, c, prompt["prompt_ids"], case["float32"], bf16[prompt["name"]], "float32", "bfloat16")
            print(f"{prompt['name']}: parts at {r.position}, float64 margin {r.margin:+.4f}, band {r.band:.4f}: "
                  f"{r.verdict} ({r.excess:.2f} of the band)")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("calibrate_adjudicate.py", main))
