#!/usr/bin/env python3
"""Write tests/fixtures/default_model/greedy.json: Hugging Face transformers' greedy continuations
of the embedded default model, computed in float32 on exactly the values llama3_np reads.

    python tools/fetch_default_model.py && python tools/make_default_model_reference.py

(needs `make tools`). The model is the default model's Q4_1 GGUF (SmolLM2-135M-Instruct), imported
by `llama3_np.formats.gguf_to_hf.import_gguf` into a temporary Hugging Face folder of its exact
dequantized values in float32 (`ggml_blocks`, bit-equal to `gguf.quants.dequantize`, which this
script checks again on every tensor). For three fixed prompts, the prompt ids come
from the folder's own tokenizer.json through `PreTrainedTokenizerFast`, and 64 tokens are chosen
by argmax, one at a time with the KV cache, never stopping at an end-of-turn token. Each step's
margin (top logit minus runner-up) is kept, so a test that diverges can tell a near-tie from a bug.
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
import transformers  # noqa: E402

import gguf  # noqa: E402
import numpy as np  # noqa: E402

from llama3_np.assets import DEFAULT_MODEL_GGUF, DEFAULT_MODEL_SHA256, default_model  # noqa: E402
from llama3_np.formats.gguf_file import GGUFFile  # noqa: E402
import torch_reference as ref  # noqa: E402

OUT = REPO / "tests" / "fixtures" / "default_model" / "greedy.json"
NEW_TOKENS = 64
PROMPTS = [
    {"kind": "text", "text": "The three primary colors are"},
    {"kind": "chat", "messages": [{"role": "user", "content": "What is the capital of France? Answer in one "
                                                              "sentence, then name two landmarks there."}]},
    {"kind": "text", "text": "In 1969, Apollo 11 landed on the Moon. Three facts about the mission:\n1."},
]


def greedy(model, prompt_ids: list[int]) -> tuple[list[int], list[float]]:
    ids, margins = [], []
    cache = transformers.DynamicCache()
    step = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            out = model(input_ids=step, past_key_values=cache, use_cache=True)
            top2 = torch.topk(out.logits[0, -1], 2)
            ids.append(int(top2.indices[0]))
            margins.append(float(top2.values[0] - top2.values[1]))
            step = top2.indices[:1].view(1, 1)
    return ids, margins


def llama_cpp_greedy(path, prompt_ids: list[int]) -> list[int]:
    """llama.cpp's greedy continuation of the same ids on the same file (llama-cpp-python, CPU,
    its default arithmetic), the last position's logits read from its context after each eval.
    ggml's extra buffer types are off (the model parameter use_extra_bufts): on a CPU that reports
    AMX where the kernel does not enable it, their AMX tile products stop the process (SIGILL).
    Without them the committed ids, made with them on an AVX2 CPU, come out the same (checked on
    an AVX-512 one)."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    defaults = low.llama_model_default_params  # Llama reads its model parameters from here

    def model_params():
        params = defaults()
        params.use_extra_bufts = False
        return params

    low.llama_model_default_params = model_params
    try:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt_ids) + NEW_TOKENS, n_threads=2, verbose=False)
    finally:
        low.llama_model_default_params = defaults
    vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))

    llm.eval(prompt_ids)
    ids = []
    for _ in range(NEW_TOKENS):
        ids.append(int(np.argmax(last_logits())))
        llm.eval([ids[-1]])
    return ids


def check_exact(path) -> None:
    """Every tensor's values bit-equal to the gguf package's dequantizer."""
    for t in GGUFFile(path).tensors.values():
        reference = np.asarray(gguf.quants.dequantize(t.raw(), gguf.GGMLQuantizationType(t.type.id)), np.float32)
        assert np.array_equal(t.values().reshape(-1).view(np.uint32), reference.reshape(-1).view(np.uint32)), t.name


def main() -> int:
    with ref.default_model_folder() as folder:
        return write_fixture(folder)


def write_fixture(folder: Path) -> int:
    check_exact(default_model())
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    chat_template = json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    cases = []
    for prompt in PROMPTS:
        text = prompt["text"] if prompt["kind"] == "text" else tokenizer.apply_chat_template(
            prompt["messages"], chat_template=chat_template, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        ids, margins = greedy(model, prompt_ids)
        llama_cpp_ids = llama_cpp_greedy(default_model(), prompt_ids)
        cases.append({"prompt": text, "prompt_ids": prompt_ids, "ids": ids,
                      "text": tokenizer.decode(ids), "margins": [round(m, 6) for m in margins],
                      "llama_cpp_ids": llama_cpp_ids})
        agree = next((k for k, (a, b) in enumerate(zip(ids, llama_cpp_ids)) if a != b), len(ids))
        print(f"{text!r} -> {tokenizer.decode(ids)!r} (smallest margin {min(margins):.4f}; llama.cpp agrees on "
              f"{agree} of {len(ids)})")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({
        "model": {"file": DEFAULT_MODEL_GGUF, "sha256": DEFAULT_MODEL_SHA256,
                  "values": "exact (ggml_blocks), float32 in transformers"},
        "producer": {"tool": "tools/make_default_model_reference.py", "dtype": "float32",
                     "transformers": metadata.version("transformers"), "torch": metadata.version("torch"),
                     "llama_cpp_ids": f"llama-cpp-python {metadata.version('llama_cpp_python')}, CPU, greedy"},
        "new_tokens": NEW_TOKENS, "cases": cases}, indent=1, ensure_ascii=False)
    # One line per list of numbers.
    text = compact_number_lists(text)
    OUT.write_text(text + "\n")
    print(f"wrote {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("make_default_model_reference", main))
