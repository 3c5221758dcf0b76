#!/usr/bin/env python3
"""Write the default model's low-precision references: what transformers computes in bfloat16 and in
float16 and Meta's llama-models in bfloat16, on CPU, for 20 prompts.

    python tools/fetch_default_model.py && python tools/make_precision_reference.py

(needs `make tools`). The model is the default model's Q4_1 GGUF (SmolLM2-135M-Instruct), imported
by `llama3_np.formats.gguf_to_hf.import_gguf` into a temporary Hugging Face folder of its exact
dequantized values in float32, which each engine rounds to its dtype as it loads them (as llama3_np's
compute modes round the same values, `linear.mode_weights`).
Prompts: the three of greedy.json (tools/make_default_model_reference.py) and 17 of
tests/fixtures/xcheck/calibration_prompts.json (prose in eight languages, numbers, a formula, emoji,
JSON, C, Python, one word). Their ids come from llama3_np's tokenizer, which equals transformers'
on this model (tests/fixtures/default_model/greedy.json holds the proof for three prompts; the
calibration prompts' ids are checked below against `PreTrainedTokenizerFast`).

For each producer and prompt: 64 tokens chosen by argmax (the first of tied logits), one at a time
with the KV cache, never stopping at an end token, each with its margin (top logit minus runner-up,
0 for a tie).

Writes tests/fixtures/default_model/greedy_low_precision.json.
"""

from __future__ import annotations

import json
import os
import sys
from importlib import metadata
from pathlib import Path

from tool_support import REPO, compact_number_lists, run_tool  # first: it makes this checkout's llama3_np importable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import torch_reference as ref  # noqa: E402
from llama3_np.assets import DEFAULT_MODEL_GGUF, DEFAULT_MODEL_SHA256  # noqa: E402
from llama3_np.text.tokenizer import load_tokenizer  # noqa: E402

transformers = ref.transformers_module()

OUT = REPO / "tests" / "fixtures" / "default_model"
NEW_TOKENS = 64
CALIBRATION_PROMPTS = ["question_en", "completion_en", "recipe_en", "french", "german", "spanish", "italian",
                       "russian", "chinese", "japanese", "numbers", "math", "emoji_mixed", "json", "c_code",
                       "python_code", "one_token"]
# file prefix -> (reference, torch dtype, dtype name)
PRODUCERS = {
    "hf_bf16": ("hf", torch.bfloat16, "bfloat16"),
    "hf_fp16": ("hf", torch.float16, "float16"),
    "meta_bf16": ("meta", torch.bfloat16, "bfloat16"),
}


def prompts(folder) -> list[dict]:
    """[{name, text, prompt_ids}]: greedy.json's three, then the calibration prompts chosen above."""
    tok = load_tokenizer(folder)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    out = [{"name": f"greedy_{i}", "text": c["prompt"], "prompt_ids": c["prompt_ids"]}
           for i, c in enumerate(json.loads((OUT / "greedy.json").read_text())["cases"])]
    table = {p["name"]: p for p in json.loads(
        (REPO / "tests" / "fixtures" / "xcheck" / "calibration_prompts.json").read_text())["prompts"]}
    for name in CALIBRATION_PROMPTS:
        text = table[name]["text"]
        ids = tok.encode(text)
        if ids != fast(text, add_special_tokens=True)["input_ids"]:
            raise SystemExit(f"prompt {name}: llama3_np's ids differ from transformers'")
        out.append({"name": name, "text": text, "prompt_ids": ids})
    return out


def choose(logits: torch.Tensor) -> int:
    """The greedy id: the first of the largest logits (torch.argmax's rule, and NumPy's). In
    bfloat16 two logits tie often (near 10 they are 1/16 apart), so the rule matters."""
    return int(torch.argmax(logits))


def margin(logits: torch.Tensor) -> float:
    """Top logit minus runner-up: 0 for a tie."""
    values = torch.topk(logits.float(), 2).values
    return float(values[0] - values[1])


def hf_greedy(model, prompt_ids):
    """The greedy ids and their margins."""
    cache = transformers.DynamicCache(config=model.config)
    step, ids, margins = torch.tensor([prompt_ids]), [], []
    with torch.no_grad():
        for _ in range(NEW_TOKENS + 1):
            logits = model(input_ids=step, past_key_values=cache, use_cache=True).logits[0, -1]
            if len(ids) == NEW_TOKENS:
                break
            ids.append(choose(logits))
            margins.append(margin(logits))
            step = torch.tensor([ids[-1:]])
    return ids, margins


def meta_greedy(model, prompt_ids):
    ref.meta_reset_cache(model)
    step, pos, ids, margins = prompt_ids, 0, [], []
    for _ in range(NEW_TOKENS + 1):
        logits = model(torch.tensor([step]), pos)[0, -1]
        if len(ids) == NEW_TOKENS:
            break
        pos += len(step)
        ids.append(choose(logits))
        margins.append(margin(logits))
        step = ids[-1:]
    return ids, margins


def main() -> int:
    with ref.default_model_folder() as folder:
        return write_fixture(folder)


def write_fixture(folder: Path) -> int:
    ref.deterministic_torch()
    cases = prompts(folder)
    producers = {}
    for prefix, (which, dtype, dtype_name) in PRODUCERS.items():
        if which == "hf":
            model = ref.load_hf(folder, dtype)
            run, producer = hf_greedy, f"transformers {transformers.__version__} {dtype_name} eager"
        else:
            longest = max(len(c["prompt_ids"]) for c in cases) + NEW_TOKENS + 1
            model = ref.load_meta(folder, longest, dtype=dtype)
            run, producer = meta_greedy, f"llama-models {ref.package_version('llama_models')} {dtype_name}"
        results = []
        for case in cases:
            ids, margins = run(model, case["prompt_ids"])
            results.append({"name": case["name"], "ids": ids, "margins": [round(m, 6) for m in margins]})
            print(f"{prefix} {case['name']}: smallest margin {min(margins):.4f}", flush=True)
        producers[prefix] = {"producer": producer, "dtype": dtype_name, "cases": results}
        del model
    about = {"model": {"file": DEFAULT_MODEL_GGUF, "sha256": DEFAULT_MODEL_SHA256,
                       "values": "exact (ggml_blocks), float32, rounded by each engine to its dtype"},
             "tool": "tools/make_precision_reference.py", "torch": metadata.version("torch"),
             "new_tokens": NEW_TOKENS, "prompts": cases, "producers": producers}
    text = json.dumps(about, indent=1, ensure_ascii=False)
    text = compact_number_lists(text)
    (OUT / "greedy_low_precision.json").write_text(text + "\n")
    print(f"wrote {OUT.relative_to(REPO)}/greedy_low_precision.json")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("make_precision_reference", main))
