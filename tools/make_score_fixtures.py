#!/usr/bin/env python3
"""Write tests/fixtures/score/reference.json: the log-probabilities `llama3-np score` is held to.

    python tools/fetch_default_model.py && python tools/make_score_fixtures.py

(needs `make tools`: torch, transformers, gguf and llama-cpp-python, whose source distribution
carries llama.cpp's `convert_hf_to_gguf.py`). For every case, the same token ids go to

    transformers   `LlamaForCausalLM` in float32 (eager attention), then `torch.log_softmax` of
                   the float32 logits, in float32: what evaluation code on transformers sums
    llama.cpp      llama-cpp-python's `Llama(logits_all=True)` with float32 KV cache on an F32 GGUF
                   of the same weights, its `scores` (float32 logits of every position), then the
                   log-softmax in float64

and, for the default model, transformers again in float64 (the value both float32 results are
measured against). The file keeps, for every position after the first, the logprob of the next token and the
TOP_N most probable tokens with theirs. Models:

    default   weights/default-exact (SmolLM2-135M-Instruct's Q4_1 GGUF as a Hugging Face folder of its
              exact values in float32, made by `llama3-np import-gguf`, as `make fixtures` does
              first); its F32 GGUF is written by llama.cpp's own convert_hf_to_gguf.py (--outtype
              f32) into a temporary folder
    tiny      tests/fixtures/checkpoints/hf (D=32, 2 layers, V=128, llama3 rope factor 8); its F32
              GGUF is the committed tests/fixtures/checkpoints/gguf_f32.gguf (the same weights)
    tiny32    tests/fixtures/parity/llama3_2 (D=64, tied embeddings, rope factor 32), transformers only

The default model's ids come from llama3_np's tokenizer (the text is recorded with them); the tiny
models' ids are drawn with a fixed seed.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from tool_support import REPO, compact_number_lists, run_tool  # first: it makes this checkout's llama3_np importable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from llama3_np.assets import DEFAULT_MODEL_GGUF, cache_dir  # noqa: E402
from llama3_np.errors import Llama3Error  # noqa: E402
from llama3_np.load import load_tokenizer  # noqa: E402

OUT = REPO / "tests" / "fixtures" / "score" / "reference.json"
FIXTURES = REPO / "tests" / "fixtures"
TOP_N = 5
TEXTS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen; 6 CO2 + 6 H2O -> C6H12O6 + 6 O2.",
]


def top(logprobs: np.ndarray) -> tuple[list[list[int]], list[list[float]]]:
    # [N, V] -> the TOP_N ids per row (largest first, lower id first on ties) and their logprobs
    ids, values = [], []
    for row in logprobs:
        order = np.lexsort((np.arange(row.size), -row))[:TOP_N]
        ids.append(order.tolist())
        values.append([float(row[i]) for i in order])
    return ids, values


def record(source: str, ids: list[int], logprobs: np.ndarray, **extra) -> dict:
    # logprobs [T, V]: row t predicts token t + 1
    rows = logprobs[:-1]
    top_ids, top_lp = top(rows)
    return {"source": source, **extra, "ids": ids,
            "token_logprobs": [float(rows[t, ids[t + 1]]) for t in range(len(ids) - 1)],
            "top_ids": top_ids, "top_logprobs": top_lp}


def transformers_logprobs(folder: Path, ids: list[int], dtype=torch.float32) -> np.ndarray:
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]  # [T, V] in `dtype`
        return torch.log_softmax(logits, dim=-1).numpy().astype(np.float64)


def llama_cpp_logprobs(gguf: Path, ids: list[int]) -> np.ndarray:
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(gguf), logits_all=True, n_ctx=max(64, len(ids)), n_batch=512,
                          n_threads=1, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                          verbose=False)
    llm.eval(ids)
    z = np.array(llm.scores[:len(ids)], dtype=np.float32).astype(np.float64)  # [T, V]
    m = z.max(axis=-1, keepdims=True)
    return z - (m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True)))


def convert_script() -> Path:
    """llama.cpp's convert_hf_to_gguf.py from llama-cpp-python's source distribution (pip's cache,
    or downloaded with `pip download --no-deps --no-binary :all: llama-cpp-python==VERSION`)."""
    version = metadata.version("llama_cpp_python")
    work = Path(tempfile.gettempdir()) / f"llama_cpp_python-{version}-src"
    script = next(iter(glob.glob(str(work / "*" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"))), None)
    if script is None:
        work.mkdir(exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(work)], check=True)
        sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
        subprocess.run(["tar", "-xzf", str(sdist), "-C", str(work)], check=True)
        script = next(iter(glob.glob(str(work / "*" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"))))
    return Path(script)


def default_f32_gguf(folder: Path, out_dir: Path) -> Path:
    out = out_dir / "default-f32.gguf"
    run = subprocess.run([sys.executable, str(convert_script()), str(folder), "--outtype", "f32", "--outfile", str(out)],
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise Llama3Error(f"convert_hf_to_gguf.py failed (it needs sentencepiece, in the tools extra):\n{run.stderr}")
    return out


def main() -> int:
    folder = cache_dir() / "default-exact"
    if not (folder / "config.json").is_file():
        raise Llama3Error(f"{folder} is missing: run python tools/fetch_default_model.py, then llama3-np "
                          f"import-gguf {cache_dir() / 'default' / DEFAULT_MODEL_GGUF} {folder}")
    tokenizer = load_tokenizer(folder)
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        gguf = default_f32_gguf(folder, Path(tmp))
        for text in TEXTS:
            ids = tokenizer.encode(text)
            cases.append(record("transformers", ids, transformers_logprobs(folder, ids), model="default", text=text))
            cases.append(record("llama.cpp", ids, llama_cpp_logprobs(gguf, ids), model="default", text=text))
            cases.append(record("transformers-float64", ids, transformers_logprobs(folder, ids, torch.float64),
                                model="default", text=text))
    rng = np.random.default_rng(20)
    for model, path, gguf in (("tiny", FIXTURES / "checkpoints" / "hf", FIXTURES / "checkpoints" / "gguf_f32.gguf"),
                              ("tiny32", FIXTURES / "parity" / "llama3_2", None)):
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        for n in (24, 40):
            ids = rng.integers(0, vocab, n).tolist()
            cases.append(record("transformers", ids, transformers_logprobs(path, ids), model=model))
            if gguf is not None:
                cases.append(record("llama.cpp", ids, llama_cpp_logprobs(gguf, ids), model=model))
    for c in cases:
        print(f"{c['model']:<7} {c['source']:<12} {len(c['ids']):>3} tokens, sum logprob {sum(c['token_logprobs']):.6f}")
    text = json.dumps({
        "producer": {"tool": "tools/make_score_fixtures.py", "transformers": metadata.version("transformers"),
                     "torch": metadata.version("torch"), "llama_cpp_python": metadata.version("llama_cpp_python")},
        "models": {"default": "the default model's exact values (weights/default-exact, import-gguf)",
                   "tiny": "tests/fixtures/checkpoints/hf (llama.cpp: tests/fixtures/checkpoints/gguf_f32.gguf)",
                   "tiny32": "tests/fixtures/parity/llama3_2"},
        "top_n": TOP_N, "cases": cases}, indent=1, ensure_ascii=False)
    text = compact_number_lists(text)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text + "\n")
    print(f"wrote {OUT.relative_to(REPO)} ({OUT.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("make_score_fixtures.py", main))
