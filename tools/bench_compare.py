#!/usr/bin/env python3
"""The same prompt ids through llama3_np, Hugging Face `transformers` and llama.cpp, in one run.

    python tools/bench_compare.py [-m DIR] [--prompt N] [--new N] [--runs N] [-t N] [--engines LIST]

Every engine gets the synthetic prompt of `llama3-np bench`, decodes --new tokens greedily from an
empty cache --runs times after a warm-up, and reports median prefill and decode speeds, its load
time and its peak RSS. Each engine runs in its own process, one after the other, so that one's
thread pool cannot slow another (NumPy's OpenBLAS and torch's OpenMP threads both spin while they
wait for work). Every engine runs on -t threads (default: one per core). The table ends with each
llama3_np residency's speed as a multiple of every engine's, and how many of the greedy ids each
engine shares with llama3_np in float32 residency.

Engines (tools-only dependencies):
    llama3_np:float32    `llama3-np bench --dtype float32`
    llama3_np:bfloat16   `llama3-np bench --dtype bfloat16`
    hf                   transformers LlamaForCausalLM in float32 (torch==2.13.0), KV cache, logits
                         of the last prompt position only (as `generate` does)
    llama.cpp:F32        llama-cpp-python, if installed, on an F32 GGUF of the same weights with a
                         placeholder vocabulary (ids in, ids out)
    llama.cpp:BF16       the same on a BF16 GGUF (matrices in bf16, norms in F32, as llama.cpp's
                         own converter writes them)
The GGUFs are written by this tool, each in a process of its own, to a temporary folder, or to
--gguf-dir DIR and reused from there when they exist.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tool_support import REPO, run_tool  # first: it makes this checkout's llama3_np importable

from llama3_np.cli.common import model_dir
from llama3_np.config import from_hf_config
from llama3_np.xcheck.bench import decode_bytes_per_token, synthetic_prompt
from llama3_np.errors import Llama3Error
from llama3_np.products import default_threads

ENGINES = ("llama3_np:float32", "llama3_np:bfloat16", "hf", "llama.cpp:F32", "llama.cpp:BF16")
GGUF_TYPES = {"F32": "f32.gguf", "BF16": "bf16.gguf"}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_runs(prefill, step, prompt: list[int], new: int, runs: int) -> dict:
    """Median speeds of greedy generations: `prefill(ids) -> first id`, `step(id) -> next id`,
    each starting from an empty cache. One short warm-up first."""
    def generate(ids, n):
        t0 = time.perf_counter()
        token = prefill(ids)
        t1 = time.perf_counter()
        out = [token]
        for _ in range(n - 1):
            token = step(token)
            out.append(token)
        return t1 - t0, time.perf_counter() - t1, out

    generate(prompt[:16], min(new, 4))
    prefill_speeds, decode_speeds = [], []
    for _ in range(runs):
        p, d, ids = generate(prompt, new)
        prefill_speeds.append(len(prompt) / p)
        decode_speeds.append((new - 1) / d)
    return {"prefill_tokens_per_s": statistics.median(prefill_speeds),
            "decode_tokens_per_s": statistics.median(decode_speeds), "ids": ids}


def run_hf(path: Path, prompt: list[int], new: int, runs: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    state = {}

    def prefill(ids):
        out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        state["cache"] = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def step(token):
        out = model(torch.tensor([[token]]), past_key_values=state["cache"], use_cache=True)
        state["cache"] = out.past_key_values
        return int(out.logits[0, -1].argmax())

    with torch.inference_mode():
        result = timed_runs(prefill, step, prompt, new, runs)
    return dict(result, load_s=load_s, peak_rss_mb=peak_rss_mb(),
                threads=f"{torch.get_num_threads()} (torch)", version=f"transformers {__import__('transformers').__version__}, torch {torch.__version__}")


def write_gguf(checkpoint, out: Path, file_type: str) -> None:
    """The checkpoint's weights as a GGUF llama.cpp runs, its matrices F32 or BF16 (`file_type`),
    its norms F32: Meta names become GGUF names, rows stay in Meta's rope order (as llama.cpp's own
    converter writes them), llama3 rope scaling goes into a `rope_freqs` tensor of per-pair
    divisors, and the vocabulary is placeholders."""
    import gguf
    import ml_dtypes
    import numpy as np

    from llama3_np.model import rope_frequencies

    c = checkpoint.config
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.ffn_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if file_type == "F32" else gguf.LlamaFileType.MOSTLY_BF16)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(c.vocab_size)])
    w.add_token_scores([0.0] * c.vocab_size)
    w.add_token_types([gguf.TokenType.NORMAL] * c.vocab_size)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(False)
    if c.rope_scaling is not None:
        plain = rope_frequencies(type(c)(**dict(c.to_dict(), rope_scaling=None)))
        w.add_tensor("rope_freqs.weight", (plain / rope_frequencies(c)).astype(np.float32))
    names = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output",
             "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
             "attention.wo": "attn_output", "attention_norm": "attn_norm", "feed_forward.w1": "ffn_gate",
             "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up", "ffn_norm": "ffn_norm"}
    for name, array in checkpoint.weights.items():
        if name == "output.weight" and c.tie_embeddings:
            continue
        base = name[:-len(".weight")]
        if base.startswith("layers."):
            _, i, rest = base.split(".", 2)
            gguf_name = f"blk.{i}.{names[rest]}.weight"
        else:
            gguf_name = f"{names[base]}.weight"
        if file_type == "BF16" and array.ndim == 2:
            bf16 = np.ascontiguousarray(array, dtype=ml_dtypes.bfloat16)  # exact: the weights are bf16
            w.add_tensor(gguf_name, bf16.view(np.uint16), raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            w.add_tensor(gguf_name, np.ascontiguousarray(array, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def run_llama_cpp(path: Path, prompt: list[int], new: int, runs: int, threads: int, gguf_path: Path) -> dict:
    import numpy as np
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(str(gguf_path), n_ctx=len(prompt) + new, n_batch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t0

    def last_argmax() -> int:  # the logits of the last token of the last eval (its only output)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

    def prefill(ids):
        llm.reset()
        llm.eval(ids)
        return last_argmax()

    def step(token):
        llm.eval([token])
        return last_argmax()

    import llama_cpp
    return dict(timed_runs(prefill, step, prompt, new, runs), load_s=load_s, peak_rss_mb=peak_rss_mb(),
                threads=str(threads), version=f"llama-cpp-python {llama_cpp.__version__}")


def run_llama3_np(path: Path, residency: str, prompt_n: int, new: int, runs: int, threads: int) -> dict:
    from llama3_np.products import set_threads
    from llama3_np.xcheck.bench import bench

    set_threads(threads)
    r = bench(path, residency, prompt_n, new, runs)
    return {"prefill_tokens_per_s": r.prefill_tokens_per_s, "decode_tokens_per_s": r.decode_tokens_per_s,
            "ids": r.ids, "load_s": r.load_s, "peak_rss_mb": r.peak_rss_mb, "threads": r.threads,
            "version": "llama3_np", "decode_fraction": r.decode_fraction, "prefill_fraction": r.prefill_fraction,
            "decode_fraction_of_matvec": r.decode_fraction_of_matvec, "bandwidth_gb_s": r.bandwidth_gb_s,
            "matvec_gb_s": r.matvec_gb_s, "sgemm_gflop_s": r.sgemm_gflop_s,
            "decode_bytes_per_token": r.decode_bytes_per_token, "bfloat16_conversion": r.bfloat16_conversion,
            "conversion_gb_s": r.conversion_gb_s, "ml_dtypes_version": r.ml_dtypes_version}


def worker(engine: str, path: Path, prompt_n: int, new: int, runs: int, threads: int, gguf_dir: Path) -> dict:
    config = from_hf_config(json.loads((path / "config.json").read_text()))
    prompt = synthetic_prompt(prompt_n, config.vocab_size)
    kind, _, variant = engine.partition(":")
    if kind == "llama3_np":
        return run_llama3_np(path, variant, prompt_n, new, runs, threads)
    if kind == "hf":
        return run_hf(path, prompt, new, runs, threads)
    return run_llama_cpp(path, prompt, new, runs, threads, gguf_dir / GGUF_TYPES[variant])


def available(engine: str) -> bool:
    module = {"llama3_np": "numpy", "hf": "transformers", "llama.cpp": "llama_cpp"}[engine.partition(":")[0]]
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def compare(args) -> int:
    path = model_dir(args.model)
    if not (path / "config.json").is_file():
        raise Llama3Error(f"{path}: no config.json; bench_compare needs a Hugging Face checkpoint folder")
    if args.gguf_dir:
        Path(args.gguf_dir).mkdir(parents=True, exist_ok=True)
        return run_engines(path, args, Path(args.gguf_dir))
    with tempfile.TemporaryDirectory() as tmp:
        return run_engines(path, args, Path(tmp))


def run_engines(path: Path, args, gguf_dir: Path) -> int:
    results = {}
    load_average = os.getloadavg()[0]
    for engine in args.engines:
        if not available(engine):
            print(f"{engine}: not installed, skipped", file=sys.stderr)
            continue
        kind, _, variant = engine.partition(":")
        if kind == "llama.cpp" and not (gguf_dir / GGUF_TYPES[variant]).is_file():
            # In a process of its own, so that its memory is not counted as llama.cpp's.
            print(f"writing {GGUF_TYPES[variant]} ...", file=sys.stderr)
            subprocess.run([sys.executable, __file__, "--write-gguf", str(gguf_dir / GGUF_TYPES[variant]),
                            "--gguf-type", variant, "-m", str(path)], check=True)
        print(f"running {engine} ...", file=sys.stderr)
        cmd = [sys.executable, __file__, "--worker", engine, "-m", str(path), "--prompt", str(args.prompt),
               "--new", str(args.new), "--runs", str(args.runs), "--threads", str(args.threads),
               "--gguf-dir", str(gguf_dir)]
        env = dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
        if done.returncode != 0:
            raise Llama3Error(f"{engine} failed (exit status {done.returncode}); see its messages above")
        results[engine] = json.loads(done.stdout.strip().splitlines()[-1])
    config = from_hf_config(json.loads((path / "config.json").read_text()))
    print(table(results, args, load_average, config))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


def table(results: dict, args, load_average: float, config) -> str:
    ours = {e: r for e, r in results.items() if e.startswith("llama3_np:")}
    reference = results.get("llama3_np:float32") or next(iter(ours.values()), None)
    ratio_heads = "".join(f" {e.split(':')[1] + ' / engine, prefill':>27s} {'decode':>7s}" for e in ours)
    lines = [f"prompt {args.prompt} tokens, {args.new} new tokens, median of {args.runs} runs, "
             f"{args.threads} threads; load average {load_average:.2f} at the start",
             f"{'engine':19s} {'load s':>7s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'peak RSS MB':>12s}"
             f"{ratio_heads} {'same ids':>9s}  threads, version"]
    for engine, r in results.items():
        ratios = "".join(f" {o['prefill_tokens_per_s'] / r['prefill_tokens_per_s']:27.2f} "
                         f"{o['decode_tokens_per_s'] / r['decode_tokens_per_s']:7.2f}" for o in ours.values())
        same = f"{common_prefix(reference['ids'], r['ids'])}/{len(r['ids'])}" if reference else ""
        lines.append(f"{engine:19s} {r['load_s']:7.2f} {r['prefill_tokens_per_s']:14.1f} "
                     f"{r['decode_tokens_per_s']:13.1f} {r['peak_rss_mb']:12.0f}{ratios} {same:>9s}  "
                     f"{r['threads']}, {r['version']}")
    for engine, o in ours.items():
        lines.append(f"{engine}: decode {o['decode_fraction']:.2f} of the read bandwidth {o['bandwidth_gb_s']:.1f} GB/s "
                     f"({o['decode_fraction_of_matvec']:.2f} of the matrix-vector rate {o['matvec_gb_s']:.1f} GB/s), "
                     f"prefill {o['prefill_fraction']:.2f} of {o['sgemm_gflop_s']:.1f} GFLOP/s (limits measured in "
                     "its process)")
        lines.append(f"{engine}: bfloat16 conversion {o['bfloat16_conversion']} (timed at the first bfloat16 product); "
                     + ", ".join(f"{name} {rate:.1f} GB/s" for name, rate in o["conversion_gb_s"].items())
                     + f" of bfloat16 on {o['threads']} threads (ml_dtypes {o['ml_dtypes_version']})")
    for engine, r in results.items():  # what llama.cpp reads per second while decoding
        if engine.startswith("llama.cpp:"):
            per_token = decode_bytes_per_token(config, 2 if engine.endswith("BF16") else 4, args.prompt, args.new)
            lines.append(f"{engine}: decode reads about {per_token * r['decode_tokens_per_s'] / 1e9:.1f} GB/s "
                         "(its matrices, and the cache counted as llama3_np's float32 one)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", metavar="DIR", help="Hugging Face checkpoint folder (default: the default model)")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("-t", "--threads", type=int, default=default_threads(),
                   help=f"threads of every engine (default: one per core, here {default_threads()})")
    p.add_argument("--engines", type=lambda s: s.split(","), default=list(ENGINES),
                   help=f"comma-separated, from {','.join(ENGINES)}")
    p.add_argument("--json", metavar="FILE", help="also write every engine's figures to FILE")
    p.add_argument("--gguf-dir", metavar="DIR", help="where llama.cpp's GGUFs (f32.gguf, bf16.gguf) are reused from "
                                                     "or written to (default: a temporary folder, removed after the run)")
    p.add_argument("--gguf-type", choices=list(GGUF_TYPES), default="F32", help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--write-gguf", metavar="PATH", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for engine in args.engines:
        if engine not in ENGINES:
            p.error(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if args.write_gguf:
        from llama3_np.formats.checkpoint import load_checkpoint

        return run_tool("bench_compare", lambda: write_gguf(load_checkpoint(model_dir(args.model), dtype="bfloat16"),
                                                            Path(args.write_gguf), args.gguf_type))
    if args.worker:
        return run_tool("bench_compare", lambda: print(json.dumps(
            worker(args.worker, model_dir(args.model), args.prompt, args.new, args.runs, args.threads,
                   Path(args.gguf_dir)))))
    return run_tool("bench_compare", lambda: compare(args))


if __name__ == "__main__":
    sys.exit(main())
