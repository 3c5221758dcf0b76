#!/usr/bin/env python3
"""The same prompt ids through llama3_np, Hugging Face `transformers` and llama.cpp, in one run.

    python tools/bench_compare.py [-m DIR] [--prompt N] [--new N] [--runs N] [-t N] [--engines LIST]
                                  [--batch B] [--batch-prompt N] [--batch-new N] [--timeout S]

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
    llama3_np:batch      `model.forward_batch` in float32 residency: --batch sequences of --batch-prompt
                         tokens (distinct synthetic prompts) prefilled in one pass, then --batch-new
                         greedy tokens each, one pass per step for all of them
    llama.cpp:batch      the same through llama.cpp's batched decode (llama-cpp-python's low-level
                         llama_batch: one llama_decode per step, each sequence its own seq_id in a
                         context of --batch sequences) on the F32 GGUF

Before the engines, a process of its own measures this machine's limits (`limits` below): the read
bandwidth, the sgemm rate and each bfloat16 conversion's rate (as `llama3-np bench` does), and the
weight products of one decode step at this model's shapes, alone: through llama3_np's products in
float32 and in bfloat16, and through NumPy's OpenBLAS on its own -t threads (a hand-off in C). Every
engine's figures are printed beside them: decode as a fraction of the read bandwidth (the bytes of
its residency), prefill as a fraction of the sgemm rate, and llama3_np's decode beside its products
alone (what the rest of a step, attention, norms and Python, costs). Each engine's row carries the
load average at its start: the machine may be shared. An engine that takes longer than --timeout
seconds is stopped and reported as such (llama.cpp's threads spin, and on a busy machine its decode
can take many times longer).
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
from typing import Optional

from tool_support import run_tool  # first: it makes this checkout's llama3_np importable

from llama3_np.cli.common import model_dir
from llama3_np.config import from_hf_config
from llama3_np.xcheck.bench import decode_bytes_per_token, prefill_flops, synthetic_prompt
from llama3_np.errors import Llama3Error
from llama3_np.products import default_threads

ENGINES = ("llama3_np:float32", "llama3_np:bfloat16", "hf", "llama.cpp:F32", "llama.cpp:BF16", "llama3_np:batch",
           "llama.cpp:batch")
GGUF_TYPES = {"F32": "f32.gguf", "BF16": "bf16.gguf"}
# The decode-step products of the limits are timed on at most this many bytes of float32 matrices
# (whole layers, at least one, and a slice of the output projection of at most half of it), far
# more than the CPU's cache, and scaled to the model's layers and vocabulary: so that an 8B shape's
# limits need 2.4 GB, not 48.
LIMIT_PRODUCT_BYTES = 1_500_000_000
LIMIT_ROUNDS = 7


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


def run_llama_cpp_batch(path: Path, prompts: list[list[int]], new: int, runs: int, threads: int,
                        gguf_path: Path) -> dict:
    """Batched greedy decoding through llama.cpp's own batch: every prompt's tokens in llama_decode
    calls of at most n_batch tokens (each token tagged with its sequence), then one llama_decode of
    len(prompts) tokens per step."""
    import llama_cpp as lc
    import numpy as np

    from llama_cpp._logger import set_verbose

    set_verbose(False)  # llama.cpp's log: errors only, as Llama(verbose=False) has it
    B, P = len(prompts), len(prompts[0])
    t0 = time.perf_counter()
    lc.llama_backend_init()
    model = lc.llama_model_load_from_file(str(gguf_path).encode(), lc.llama_model_default_params())
    params = lc.llama_context_default_params()
    params.n_ctx = B * 256 * -(-(P + new) // 256)  # each sequence's share a multiple of 256, as llama.cpp wants
    params.n_batch = params.n_ubatch = 512
    params.n_seq_max = B
    params.n_threads = params.n_threads_batch = threads
    ctx = lc.llama_init_from_model(model, params)
    load_s = time.perf_counter() - t0
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    batch = lc.llama_batch_init(512, 0, 1)

    def decode(items) -> list[int]:  # the argmax of each item that wants logits
        return [int(np.argmax(x)) for x in llama_decode(lc, ctx, batch, items, n_vocab)]

    def generate(prompts, n):
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        t0 = time.perf_counter()
        items = [(t, pos, b, pos == len(p) - 1) for b, p in enumerate(prompts) for pos, t in enumerate(p)]
        tokens = []
        for start in range(0, len(items), 512):
            tokens += decode(items[start:start + 512])
        t1 = time.perf_counter()
        out = [[t] for t in tokens]
        for k in range(n - 1):
            tokens = decode([(t, len(prompts[b]) + k, b, True) for b, t in enumerate(tokens)])
            for b, t in enumerate(tokens):
                out[b].append(t)
        return t1 - t0, time.perf_counter() - t1, out

    result = batch_runs(generate, prompts, new, runs)
    lc.llama_batch_free(batch)
    return dict(result, load_s=load_s, peak_rss_mb=peak_rss_mb(), threads=str(threads),
                version=f"llama-cpp-python {lc.__version__}, llama_batch of {B} sequences")


def batch_runs(generate, prompts: list[list[int]], new: int, runs: int) -> dict:
    """Median throughputs of `generate(prompts, new) -> (prefill s, decode s, ids per sequence)`,
    over all sequences, after one short warm-up."""
    generate([p[:8] for p in prompts], min(new, 4))
    prefill, decode = [], []
    for _ in range(runs):
        p, d, ids = generate(prompts, new)
        prefill.append(sum(map(len, prompts)) / p)
        decode.append(len(prompts) * (new - 1) / d)
    return {"prefill_tokens_per_s": statistics.median(prefill), "decode_tokens_per_s": statistics.median(decode),
            "ids": ids[0], "batch_ids": ids}


def run_llama3_np_batch(path: Path, prompts: list[list[int]], new: int, runs: int, threads: int) -> dict:
    """Batched greedy decoding through `model.forward_batch`, float32 residency; None when this
    checkout's model has no batched forward."""
    from llama3_np import model as llama_model
    from llama3_np.formats.checkpoint import load_checkpoint
    from llama3_np.products import set_threads

    if not hasattr(llama_model, "forward_batch"):
        return None
    set_threads(threads)
    t0 = time.perf_counter()
    checkpoint = load_checkpoint(path, dtype="float32")
    load_s = time.perf_counter() - t0
    weights, config = checkpoint.weights, checkpoint.config

    def generate(prompts, n):
        caches = [llama_model.KVCache(config, len(p) + n) for p in prompts]
        t0 = time.perf_counter()
        logits = llama_model.forward_batch(weights, config, prompts, caches, last_only=True)
        tokens = [int(l[-1].argmax()) for l in logits]
        t1 = time.perf_counter()
        out = [[t] for t in tokens]
        for _ in range(n - 1):
            logits = llama_model.forward_batch(weights, config, [[t] for t in tokens], caches, last_only=True)
            tokens = [int(l[-1].argmax()) for l in logits]
            for b, t in enumerate(tokens):
                out[b].append(t)
        return t1 - t0, time.perf_counter() - t1, out

    return dict(batch_runs(generate, prompts, new, runs), load_s=load_s, peak_rss_mb=peak_rss_mb(),
                threads=str(threads), version=f"llama3_np forward_batch of {len(prompts)} sequences")


def run_limits(config, threads: int) -> dict:
    """This machine's limits, and the weight products of one decode step at `config`'s shapes
    alone (see the module docstring), in ms: the best of interleaved rounds."""
    import numpy as np
    from measure_products import matrices

    from llama3_np import products
    from llama3_np.dtypes import bfloat16
    from llama3_np.xcheck.bench import measure_conversions, measure_read_bandwidth, measure_sgemm

    products.set_threads(threads)
    load_average = os.getloadavg()[0]
    shapes = matrices(config)
    layer, (V, D) = shapes[:7], shapes[-1]
    layers = max(1, min(config.n_layers, LIMIT_PRODUCT_BYTES // (4 * sum(a * b for a, b in layer))))
    out_rows = max(1, min(V, LIMIT_PRODUCT_BYTES // 2 // (4 * D)))
    float32 = [np.full(s, 0.01, dtype=np.float32) for s in layer * layers] + [np.full((out_rows, D), 0.01, np.float32)]
    bf16 = [w.astype(bfloat16()) for w in float32]
    inputs = {n_in: np.full((1, n_in), 0.5, dtype=np.float32) for _, n_in in shapes}
    blas = products._find_openblas()  # None: no OpenBLAS to time on its own threads

    def on_blas_threads(ws):
        blas.set_threads(threads)
        try:
            for w in ws:
                inputs[w.shape[1]] @ w.T
        finally:
            blas.set_threads(1)

    def through_products(ws):
        for w in ws:
            products.linear(inputs[w.shape[1]], w)

    variants = {"float32": through_products, "bfloat16": through_products}
    if blas is not None:
        variants["float32 on OpenBLAS's threads"] = on_blas_threads
    weights = {"float32": float32, "bfloat16": bf16, "float32 on OpenBLAS's threads": float32}
    best = {(v, part): float("inf") for v in variants for part in ("layers", "output")}
    for _ in range(LIMIT_ROUNDS):
        for v, run in variants.items():
            for part, ws in (("layers", weights[v][:-1]), ("output", weights[v][-1:])):
                t0 = time.perf_counter()
                run(ws)
                best[v, part] = min(best[v, part], time.perf_counter() - t0)
    step_ms = {v: 1e3 * (best[v, "layers"] * config.n_layers / layers + best[v, "output"] * V / out_rows)
               for v in variants}
    del float32, bf16, weights
    return {"load_average": load_average, "bandwidth_gb_s": measure_read_bandwidth() / 1e9,
            "sgemm_gflop_s": measure_sgemm() / 1e9, "bfloat16_conversion": products.bfloat16_conversion(),
            "conversion_gb_s": {k: r / 1e9 for k, r in measure_conversions().items()},
            "decode_products_ms": step_ms, "product_layers_timed": layers, "output_rows_timed": out_rows,
            "threads": threads}


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


def worker(engine: str, path: Path, args, gguf_dir: Path) -> Optional[dict]:
    config = from_hf_config(json.loads((path / "config.json").read_text()))
    if engine == "limits":
        return run_limits(config, args.threads)
    kind, _, variant = engine.partition(":")
    if variant == "batch":
        ids = synthetic_prompt(args.batch * args.batch_prompt, config.vocab_size)
        prompts = [ids[b * args.batch_prompt:(b + 1) * args.batch_prompt] for b in range(args.batch)]
        if kind == "llama3_np":
            return run_llama3_np_batch(path, prompts, args.batch_new, args.runs, args.threads)
        return run_llama_cpp_batch(path, prompts, args.batch_new, args.runs, args.threads, gguf_dir / GGUF_TYPES["F32"])
    prompt = synthetic_prompt(args.prompt, config.vocab_size)
    if kind == "llama3_np":
        return run_llama3_np(path, variant, args.prompt, args.new, args.runs, args.threads)
    if kind == "hf":
        return run_hf(path, prompt, args.new, args.runs, args.threads)
    return run_llama_cpp(path, prompt, args.new, args.runs, args.threads, gguf_dir / GGUF_TYPES[variant])


def available(engine: str) -> bool:
    module = {"llama3_np": "numpy", "hf": "transformers", "llama.cpp": "llama_cpp"}[engine.partition(":")[0]]
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def llama_decode(lc, ctx, batch, items, n_vocab: int) -> list:
    """One llama_decode of `items` (token, pos, seq, wants logits) through llama-cpp-python's
    low-level API, several sequences in one batch; the logits [n_vocab] of each item that wants them."""
    import numpy as np

    batch.n_tokens = len(items)
    for i, (token, pos, seq, logits) in enumerate(items):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
        batch.seq_id[i][0] = seq
    if lc.llama_decode(ctx, batch) != 0:
        raise RuntimeError("llama_decode failed")
    return [np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
            for i, item in enumerate(items) if item[3]]


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
    rounds, notes = {}, {}
    load_average = os.getloadavg()[0]
    config = from_hf_config(json.loads((path / "config.json").read_text()))
    for r in range(args.rounds):
        for engine in ["limits"] + args.engines:
            if engine in notes or (engine != "limits" and not available(engine)):
                notes.setdefault(engine, "not installed, skipped")
                continue
            result = run_worker(engine, path, args, gguf_dir, f"round {r + 1} of {args.rounds}")
            if isinstance(result, str):
                notes[engine] = result
            else:
                rounds.setdefault(engine, []).append(result)
        # After every round, so that a run stopped early keeps the rounds it finished.
        if args.json:
            Path(args.json).write_text(json.dumps(dict(rounds, notes=notes), indent=1) + "\n")
        if r + 1 < args.rounds:
            print(f"after round {r + 1} of {args.rounds}:", file=sys.stderr)
            print(table({e: combine(runs) for e, runs in rounds.items()}, notes, args, load_average, config), file=sys.stderr)
    print(table({engine: combine(runs) for engine, runs in rounds.items()}, notes, args, load_average, config))
    return 0


def run_worker(engine: str, path: Path, args, gguf_dir: Path, when: str):
    """One engine's figures from a process of its own, with the load average at its start; or a
    note saying why there are none."""
    kind, _, variant = engine.partition(":")
    file_type = "F32" if variant == "batch" else variant
    if kind == "llama.cpp" and not (gguf_dir / GGUF_TYPES[file_type]).is_file():
        # In a process of its own, so that its memory is not counted as llama.cpp's.
        print(f"writing {GGUF_TYPES[file_type]} ...", file=sys.stderr)
        subprocess.run([sys.executable, __file__, "--write-gguf", str(gguf_dir / GGUF_TYPES[file_type]),
                        "--gguf-type", file_type, "-m", str(path)], check=True)
    started = os.getloadavg()[0]
    print(f"running {engine}, {when} (load average {started:.2f}) ...", file=sys.stderr)
    cmd = [sys.executable, __file__, "--worker", engine, "-m", str(path), "--prompt", str(args.prompt),
           "--new", str(args.new), "--runs", str(args.runs), "--threads", str(args.threads),
           "--batch", str(args.batch), "--batch-prompt", str(args.batch_prompt),
           "--batch-new", str(args.batch_new), "--gguf-dir", str(gguf_dir)]
    env = dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
    try:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return f"stopped after {args.timeout:.0f} s ({when}, load average {started:.2f} at its start)"
    if done.returncode != 0:
        raise Llama3Error(f"{engine} failed (exit status {done.returncode}); see its messages above")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result is None:
        return "not run: this checkout's model has no batched forward (model.forward_batch)"
    return dict(result, load_average=started)


SPEEDS = ("prefill_tokens_per_s", "decode_tokens_per_s")


def combine(runs: list[dict]) -> dict:
    """One engine's rounds as one row: the median of each figure (the largest peak RSS), the
    rounds' speeds kept for paired ratios, the load averages as a range."""
    def median_of(values):
        if isinstance(values[0], dict):
            return {k: median_of([v[k] for v in values]) for k in values[0]}
        if isinstance(values[0], int) and not isinstance(values[0], bool):
            return statistics.median_low(values)
        if isinstance(values[0], float):
            return statistics.median(values)
        return values[0]

    row = {k: median_of([r[k] for r in runs]) for k in runs[0]}
    row["peak_rss_mb"] = max(r.get("peak_rss_mb", 0) for r in runs)
    row["rounds"] = [{k: r[k] for k in SPEEDS} for r in runs if SPEEDS[0] in r]
    loads = [r["load_average"] for r in runs]
    row["load_range"] = f"{min(loads):.1f}" if len(loads) == 1 else f"{min(loads):.1f}-{max(loads):.1f}"
    return row


def paired_ratio(ours: dict, engine: dict, key: str) -> float:
    """The median over rounds of ours / engine, each round's figures taken minutes apart."""
    return statistics.median(a[key] / b[key] for a, b in zip(ours["rounds"], engine["rounds"]))


ITEMSIZE = {"llama3_np:float32": 4, "llama3_np:bfloat16": 2, "hf": 4, "llama.cpp:F32": 4, "llama.cpp:BF16": 2,
            "llama3_np:batch": 4, "llama.cpp:batch": 4}


def table(results: dict, notes: dict, args, load_average: float, config) -> str:
    limits = results.pop("limits", None)
    single = {e: r for e, r in results.items() if not e.endswith(":batch")}
    batched = {e: r for e, r in results.items() if e.endswith(":batch")}
    ours = {e: r for e, r in single.items() if e.startswith("llama3_np:")}
    reference = results.get("llama3_np:float32") or next(iter(ours.values()), None)
    lines = [f"prompt {args.prompt} tokens, {args.new} new tokens, median of {args.runs} runs in each of "
             f"{args.rounds} rounds, {args.threads} threads; load average {load_average:.2f} at the start; "
             "ratios: the median of each round's"]
    if limits:
        conversion = limits["conversion_gb_s"]
        step = limits["decode_products_ms"]
        lines += [f"limits (a process of its own, load average {limits['load_range']}, {limits['threads']} threads): "
                  f"read bandwidth {limits['bandwidth_gb_s']:.1f} GB/s, sgemm {limits['sgemm_gflop_s']:.1f} GFLOP/s, "
                  "bfloat16 conversion " + ", ".join(f"{k} {r:.1f} GB/s" for k, r in conversion.items())
                  + f" (decode steps convert by halves, prefills by {limits['bfloat16_conversion']})",
                  f"limits: one decode step's weight products alone ({limits['product_layers_timed']} of "
                  f"{config.n_layers} layers and {limits['output_rows_timed']} of {config.vocab_size} output rows "
                  "timed, scaled): " + ", ".join(f"{k} {ms:.1f} ms ({1e3 / ms:.1f} tok/s)" for k, ms in step.items())]
    ratio_heads = "".join(f" {e.split(':')[1] + ' / engine, prefill':>27s} {'decode':>7s}" for e in ours)
    lines.append(f"{'engine':19s} {'load avg':>9s} {'load s':>7s} {'prefill tok/s':>14s} {'of sgemm':>8s} "
                 f"{'decode tok/s':>13s} {'of read':>7s} {'peak RSS MB':>12s}{ratio_heads} {'same ids':>9s}  "
                 "threads, version")
    for engine, r in single.items():
        ratios = "".join(f" {paired_ratio(o, r, SPEEDS[0]):27.2f} {paired_ratio(o, r, SPEEDS[1]):7.2f}"
                         for o in ours.values())
        same = f"{common_prefix(reference['ids'], r['ids'])}/{len(r['ids'])}" if reference else ""
        of_sgemm, of_read = limit_fractions(r, ITEMSIZE[engine], 1, args.prompt, args.new, limits, config)
        lines.append(f"{engine:19s} {r['load_range']:>9s} {r['load_s']:7.2f} {r['prefill_tokens_per_s']:14.1f} "
                     f"{of_sgemm:>8s} {r['decode_tokens_per_s']:13.1f} {of_read:>7s} {r['peak_rss_mb']:12.0f}{ratios} "
                     f"{same:>9s}  {r['threads']}, {r['version']}")
    if batched:
        lines.append(f"batched: {args.batch} sequences of {args.batch_prompt} prompt tokens, {args.batch_new} new tokens "
                     "each; tok/s over all sequences; 'of read': weight bytes per step x steps/s / read bandwidth")
        lines.append(f"{'engine':19s} {'load avg':>9s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'of read':>7s} "
                     f"{'/ its single decode':>19s} {'llama3_np / engine':>18s}  same ids")
        ours_batch = batched.get("llama3_np:batch")
        for engine, r in batched.items():
            alone = single.get("llama3_np:float32" if engine.startswith("llama3_np") else "llama.cpp:F32")
            _, of_read = limit_fractions(r, 4, args.batch, args.batch_prompt, args.batch_new, limits, config)
            vs_alone = f"{1 / paired_ratio(alone, r, SPEEDS[1]):.2f}" if alone else "-"
            vs_ours = f"{paired_ratio(ours_batch, r, SPEEDS[1]):.2f}" if ours_batch else "-"
            same = ""
            if ours_batch:
                same = f"{sum(common_prefix(a, b) for a, b in zip(ours_batch['batch_ids'], r['batch_ids']))}/" \
                       f"{sum(map(len, r['batch_ids']))}"
            lines.append(f"{engine:19s} {r['load_range']:>9s} {r['prefill_tokens_per_s']:14.1f} "
                         f"{r['decode_tokens_per_s']:13.1f} {of_read:>7s} {vs_alone:>19s} {vs_ours:>18s}  {same}")
    if limits:
        for engine, o in ours.items():
            products_ms = limits["decode_products_ms"]["bfloat16" if engine.endswith("bfloat16") else "float32"]
            step_ms = 1e3 / o["decode_tokens_per_s"]
            lines.append(f"{engine}: a decode step takes {step_ms:.1f} ms, its weight products alone {products_ms:.1f} ms, "
                         f"the rest (attention, norms, sampling, Python) about {step_ms - products_ms:.1f} ms")
        per_token = decode_bytes_per_token(config, 2, args.prompt, args.new)
        rate = limits["conversion_gb_s"].get("halves", limits["conversion_gb_s"][limits["bfloat16_conversion"]]) * 1e9
        lines.append(f"bfloat16: converting one decode step's {per_token / 1e9:.2f} GB at {rate / 1e9:.1f} GB/s alone "
                     f"bounds decode at {rate / per_token:.1f} tok/s")
    for engine, o in ours.items():
        lines.append(f"{engine}: bfloat16 conversion: decode steps by halves, prefills by {o['bfloat16_conversion']} "
                     "(timed at the first bfloat16 product); "
                     + ", ".join(f"{name} {rate:.1f} GB/s" for name, rate in o["conversion_gb_s"].items())
                     + f" of bfloat16 on {o['threads']} threads (ml_dtypes {o['ml_dtypes_version']}); its own limits: "
                     f"read bandwidth {o['bandwidth_gb_s']:.1f} GB/s, sgemm {o['sgemm_gflop_s']:.1f} GFLOP/s")
    lines += [f"{engine}: {note}" for engine, note in notes.items()]
    return "\n".join(lines)


def limit_fractions(r: dict, itemsize: int, sequences: int, prompt: int, new: int, limits: Optional[dict],
                    config) -> tuple[str, str]:
    """Prefill as a fraction of the sgemm rate, decode (weights read once a step for all `sequences`)
    as a fraction of the read bandwidth, as printable strings ("-" without limits)."""
    if not limits:
        return "-", "-"
    flops = prefill_flops(config, prompt) / prompt
    per_step = decode_bytes_per_token(config, itemsize, prompt, new)  # the cache of one sequence: small beside the weights
    return (f"{flops * r['prefill_tokens_per_s'] / (limits['sgemm_gflop_s'] * 1e9):.2f}",
            f"{per_step * r['decode_tokens_per_s'] / sequences / (limits['bandwidth_gb_s'] * 1e9):.2f}")


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
    p.add_argument("--batch", type=int, default=8, metavar="B", help="sequences of the batched engines (default 8)")
    p.add_argument("--batch-prompt", type=int, default=64, metavar="N",
                   help="prompt tokens of each batched sequence (default 64)")
    p.add_argument("--batch-new", type=int, default=32, metavar="N",
                   help="tokens each batched sequence generates (default 32)")
    p.add_argument("--rounds", type=int, default=1, metavar="R",
                   help="run the limits and every engine R times, in turn; medians, and ratios paired by round")
    p.add_argument("--timeout", type=float, default=1800, metavar="S",
                   help="stop an engine that runs longer than S seconds (default 1800)")
    p.add_argument("--json", metavar="FILE", help="also write every engine's figures to FILE (after every round)")
    p.add_argument("--gguf-dir", metavar="DIR", help="where llama.cpp's GGUFs (f32.gguf, bf16.gguf) are reused from "
                                                     "or written to (default: a temporary folder, removed after the run)")
    p.add_argument("--gguf-type", choices=list(GGUF_TYPES), default="F32", help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=ENGINES + ("limits",), help=argparse.SUPPRESS)
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
            worker(args.worker, model_dir(args.model), args, Path(args.gguf_dir)))))
    return run_tool("bench_compare", lambda: compare(args))


if __name__ == "__main__":
    sys.exit(main())
