#!/usr/bin/env python3
"""The same prompt ids through llama3_np, Hugging Face `transformers` and llama.cpp, in one run.

    python tools/bench_compare.py [-m DIR] [--prompt N] [--new N] [--runs N] [-t N] [--engines LIST]
                                  [--batch B] [--batch-prompt N] [--batch-new N] [--ppl-windows W]
                                  [--ppl-per-pass K] [--rounds R] [--timeout S] [--gguf-dir DIR]

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
    llama3_np:gguf       `llama3-np bench --dtype gguf` on a Q8_0 GGUF of the same weights (every matrix
                         in llama.cpp's Q8_0 blocks, as its own quantizer writes them; norms F32):
                         llama3_np multiplying the file's blocks, dequantized a block of rows at a time
    llama.cpp:Q8_0       llama-cpp-python on that Q8_0 GGUF, with the model parameter use_extra_bufts
                         off: on a CPU with AMX, llama.cpp's extra buffer types (AMX tiles, weights
                         repacked) die with an illegal instruction on quantized types here
    llama3_np:perplexity `perplexity`'s path (`xcheck.perplexity.run_perplexity`), float32 residency:
                         --ppl-windows windows of --prompt tokens, --ppl-per-pass windows a forward pass,
                         timed with its scoring; its tok/s is set beside llama.cpp F32's prefill rate
    llama3_np:busy1      `llama3-np bench --dtype float32` beside 1 CPU-bound process (tools/bench_busy.py's
    llama3_np:busy2      competitors), beside 2: their speeds are set beside llama3_np:float32's of the
                         same round (the quiet machine)

Before the engines, a process of its own measures this machine's limits (`limits` below): the read
bandwidth, the sgemm rate and each bfloat16 conversion's rate (as `llama3-np bench` does), and the
weight products of one decode step at this model's shapes, alone: through llama3_np's products in
float32, in bfloat16 and (with llama3_np:gguf) on Q8_0 blocks, and through NumPy's OpenBLAS on its
own -t threads (a hand-off in C). Every
engine's figures are printed beside them: decode as a fraction of the read bandwidth (the bytes of
its residency), prefill as a fraction of the sgemm rate, and llama3_np's decode beside its products
alone (what the rest of a step, attention, norms and Python, costs). Each engine's row carries the
load average at its start: the machine may be shared. An engine that takes longer than --timeout
seconds is stopped and reported as such (llama.cpp's threads spin, and on a busy machine its decode
can take many times longer).
The GGUFs are written by this tool, each in a process of its own, to a temporary folder, or to
--gguf-dir DIR and reused from there when they exist (f32.gguf, bf16.gguf, q8_0.gguf).
One run with --rounds R runs the limits and every engine in turn, R times: each figure is the median
over rounds, each ratio the median of the rounds' ratios (paired, interleaved). A run that would take
too long for one invocation (the 8B shape) is the same script on its own engines, said so where quoted.

The run ends with issue #22's targets for this model (the default model, the Llama 3.2 1B shape or
the Llama 3.1 8B shape, recognised by their dimensions): each target's figure from this run (a
ratio: the median of each round's ratio), whether it is met, and for one not met the bound this
machine's limits set (the read bandwidth, the sgemm rate, the conversion rate, the products of a
step alone) and how close the figure comes to it.
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

from tool_support import paired_ratio, run_tool  # first: it makes this checkout's llama3_np importable

from bench_busy import competitors

from llama3_np.cli.common import model_dir
from llama3_np.config import from_hf_config
from llama3_np.xcheck.bench import decode_bytes_per_token, prefill_flops, synthetic_prompt
from llama3_np.errors import Llama3Error
from llama3_np.products import default_threads

ENGINES = ("llama3_np:float32", "llama3_np:bfloat16", "hf", "llama.cpp:F32", "llama.cpp:BF16", "llama3_np:batch",
           "llama.cpp:batch", "llama3_np:gguf", "llama.cpp:Q8_0", "llama3_np:perplexity", "llama3_np:busy1",
           "llama3_np:busy2")
GGUF_TYPES = {"F32": "f32.gguf", "BF16": "bf16.gguf", "Q8_0": "q8_0.gguf"}
QUANTIZED = ("Q8_0",)  # llama.cpp runs these without its extra buffer types (see llama.cpp:Q8_0 above)
BUSY = {"llama3_np:busy1": 1, "llama3_np:busy2": 2}  # engine -> CPU-bound processes beside it
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
    w.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "BF16": gguf.LlamaFileType.MOSTLY_BF16,
                     "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[file_type])
    # Byte-level BPE with Llama 3's pre-tokenizer, as llama3_np reads a GGUF's vocabulary (llama.cpp
    # wants merges: one placeholder); nothing is tokenized, ids go in and out.
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list([f"<t{i}>" for i in range(c.vocab_size)])
    w.add_token_types([gguf.TokenType.NORMAL] * c.vocab_size)
    w.add_token_merges(["<t0> <t1>"])
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
        elif file_type == "Q8_0" and array.ndim == 2:  # llama.cpp's quantize_row_q8_0, as gguf.quants has it
            blocks = gguf.quants.quantize(np.asarray(array, dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gguf_name, blocks, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gguf_name, np.ascontiguousarray(array, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def run_llama_cpp(path: Path, prompt: list[int], new: int, runs: int, threads: int, gguf_path: Path,
                  extra_bufts: bool = True) -> dict:
    """extra_bufts False: the model loaded with use_extra_bufts off (see llama.cpp:Q8_0)."""
    import numpy as np
    import llama_cpp.llama_cpp as low
    from llama_cpp import Llama

    defaults = low.llama_model_default_params

    def model_params():  # Llama builds its model from the library's defaults: change those
        params = defaults()
        params.use_extra_bufts = extra_bufts
        return params

    t0 = time.perf_counter()
    low.llama_model_default_params = model_params
    try:
        llm = Llama(str(gguf_path), n_ctx=len(prompt) + new, n_batch=512, n_threads=threads,
                    n_threads_batch=threads, verbose=False)
    finally:
        low.llama_model_default_params = defaults
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
                threads=str(threads), version=f"llama-cpp-python {llama_cpp.__version__}"
                + ("" if extra_bufts else ", use_extra_bufts off"))


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


def run_llama3_np_perplexity(path: Path, windows: list[list[int]], per_pass: int, runs: int, threads: int) -> dict:
    """`perplexity`'s throughput, float32 residency: every window scored, `per_pass` windows a
    forward pass; tok/s = all windows' tokens / seconds, with the scoring (median of `runs`)."""
    from llama3_np.formats.checkpoint import load_checkpoint
    from llama3_np.products import set_threads
    from llama3_np.xcheck.perplexity import run_perplexity

    set_threads(threads)
    t0 = time.perf_counter()
    checkpoint = load_checkpoint(path, dtype="float32")
    load_s = time.perf_counter() - t0

    def score(wins):
        n = len(wins[0])
        t0 = time.perf_counter()
        result = run_perplexity(checkpoint.weights, checkpoint.config, [t for w in wins for t in w], n, per_pass * n)
        return len(wins) * n / (time.perf_counter() - t0), result.ppl.value

    score([w[:16] for w in windows[:max(2, per_pass)]])  # warm-up: two windows at least, as perplexity needs
    rates = [score(windows) for _ in range(runs)]
    return {"perplexity_tokens_per_s": statistics.median(r for r, _ in rates), "ppl": rates[-1][1], "load_s": load_s,
            "peak_rss_mb": peak_rss_mb(), "threads": str(threads),
            "version": f"llama3_np run_perplexity, {len(windows)} windows of {len(windows[0])}, {per_pass} a pass"}


def q8_0_weight(shape: tuple[int, int]):
    """A Q8_0 matrix of `shape` in ggml blocks (every block d = 2^-10, qs = 3): for timing products."""
    import numpy as np

    from llama3_np.formats.ggml_blocks import BLOCK_Q8_0, SUPPORTED, QuantizedWeight

    q8_0 = next(t for t in SUPPORTED.values() if t.name == "Q8_0")
    blocks = np.zeros((shape[0], shape[1] // q8_0.block_size), BLOCK_Q8_0)
    blocks["d"], blocks["qs"] = 2.0 ** -10, 3
    return QuantizedWeight(blocks.view(np.uint8).reshape(shape[0], -1), q8_0, shape)


def run_limits(config, threads: int, q8_0: bool = False) -> dict:
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
    weights = {"float32": float32, "bfloat16": bf16, "float32 on OpenBLAS's threads": float32}
    if q8_0:  # the products of `--dtype gguf` on a Q8_0 file
        variants["Q8_0"] = through_products
        weights["Q8_0"] = [q8_0_weight(w.shape) for w in float32]
    if blas is not None:
        variants["float32 on OpenBLAS's threads"] = on_blas_threads
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
        return run_limits(config, args.threads, q8_0="llama3_np:gguf" in args.engines)
    kind, _, variant = engine.partition(":")
    if engine == "llama3_np:perplexity":
        ids = synthetic_prompt(args.ppl_windows * args.prompt, config.vocab_size)
        windows = [ids[w * args.prompt:(w + 1) * args.prompt] for w in range(args.ppl_windows)]
        return run_llama3_np_perplexity(path, windows, args.ppl_per_pass, args.runs, args.threads)
    if engine in BUSY:  # the competitors run beside this process (run_worker)
        variant = "float32"
    if engine == "llama3_np:gguf":
        return run_llama3_np(gguf_dir / GGUF_TYPES["Q8_0"], "gguf", args.prompt, args.new, args.runs, args.threads)
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
    return run_llama_cpp(path, prompt, args.new, args.runs, args.threads, gguf_dir / GGUF_TYPES[variant],
                         extra_bufts=variant not in QUANTIZED)


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
    file_type = {"batch": "F32", "gguf": "Q8_0"}.get(variant, variant)
    if (kind == "llama.cpp" or engine == "llama3_np:gguf") and not (gguf_dir / GGUF_TYPES[file_type]).is_file():
        # In a process of its own, so that its memory is not counted as llama.cpp's.
        print(f"writing {GGUF_TYPES[file_type]} ...", file=sys.stderr)
        subprocess.run([sys.executable, __file__, "--write-gguf", str(gguf_dir / GGUF_TYPES[file_type]),
                        "--gguf-type", file_type, "-m", str(path)], check=True)
    started = os.getloadavg()[0]
    print(f"running {engine}, {when} (load average {started:.2f}) ...", file=sys.stderr)
    cmd = [sys.executable, __file__, "--worker", engine, "-m", str(path), "--prompt", str(args.prompt),
           "--new", str(args.new), "--runs", str(args.runs), "--threads", str(args.threads),
           "--batch", str(args.batch), "--batch-prompt", str(args.batch_prompt),
           "--batch-new", str(args.batch_new), "--ppl-windows", str(args.ppl_windows),
           "--ppl-per-pass", str(args.ppl_per_pass), "--engines", ",".join(args.engines), "--gguf-dir", str(gguf_dir)]
    env = dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
    try:
        with competitors(BUSY.get(engine, 0)):
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
PERPLEXITY = "perplexity_tokens_per_s"


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
    row["rounds"] = [{k: v for k, v in r.items() if k.endswith("_tokens_per_s")} for r in runs]
    loads = [r["load_average"] for r in runs]
    row["load_range"] = f"{min(loads):.1f}" if len(loads) == 1 else f"{min(loads):.1f}-{max(loads):.1f}"
    return row


def ratio(ours: dict, engine: dict, key: str, engine_key: Optional[str] = None) -> float:
    """ours / engine (figure `key`, the engine's `engine_key`, default `key`): the median of each
    round's ratio, the two figures of a round taken minutes apart."""
    return paired_ratio(ours["rounds"], engine["rounds"], key, engine_key)


Q8_0_ITEMSIZE = 34 / 32  # bytes per value: a float16 scale and 32 int8 values a block
ITEMSIZE = {"llama3_np:float32": 4, "llama3_np:bfloat16": 2, "hf": 4, "llama.cpp:F32": 4, "llama.cpp:BF16": 2,
            "llama3_np:batch": 4, "llama.cpp:batch": 4, "llama3_np:gguf": Q8_0_ITEMSIZE,
            "llama.cpp:Q8_0": Q8_0_ITEMSIZE, "llama3_np:busy1": 4, "llama3_np:busy2": 4}


def table(results: dict, notes: dict, args, load_average: float, config) -> str:
    results = dict(results)
    limits = results.pop("limits", None)
    apart = {"llama3_np:perplexity", *BUSY}  # engines with tables of their own
    single = {e: r for e, r in results.items() if not e.endswith(":batch") and e not in apart}
    batched = {e: r for e, r in results.items() if e.endswith(":batch")}
    ours = {e: r for e, r in single.items() if e in ("llama3_np:float32", "llama3_np:bfloat16")}
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
        ratios = "".join(f" {ratio(o, r, SPEEDS[0]):27.2f} {ratio(o, r, SPEEDS[1]):7.2f}"
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
                     f"{'/ its single decode':>19s} {'llama3_np / engine':>18s} {'same ids':>9s}  version")
        ours_batch = batched.get("llama3_np:batch")
        for engine, r in batched.items():
            alone = single.get("llama3_np:float32" if engine.startswith("llama3_np") else "llama.cpp:F32")
            _, of_read = limit_fractions(r, 4, args.batch, args.batch_prompt, args.batch_new, limits, config)
            vs_alone = f"{1 / ratio(alone, r, SPEEDS[1]):.2f}" if alone else "-"
            vs_ours = f"{ratio(ours_batch, r, SPEEDS[1]):.2f}" if ours_batch else "-"
            same = ""
            if ours_batch:
                same = f"{sum(common_prefix(a, b) for a, b in zip(ours_batch['batch_ids'], r['batch_ids']))}/" \
                       f"{sum(map(len, r['batch_ids']))}"
            lines.append(f"{engine:19s} {r['load_range']:>9s} {r['prefill_tokens_per_s']:14.1f} "
                         f"{r['decode_tokens_per_s']:13.1f} {of_read:>7s} {vs_alone:>19s} {vs_ours:>18s} {same:>9s}  "
                         f"{r['version']}")
    quiet = results.get("llama3_np:float32")
    busy = {e: r for e, r in results.items() if e in BUSY}
    if busy:
        lines.append("beside CPU-bound processes (tools/bench_busy.py's, one core's worth of work each), float32 residency; "
                     "'/ quiet': each round's speed over llama3_np:float32's of the same round")
        lines.append(f"{'engine':19s} {'load avg':>9s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'/ quiet, prefill':>17s} "
                     f"{'decode':>7s}")
        for engine, r in busy.items():
            vs = f"{ratio(r, quiet, SPEEDS[0]):17.2f} {ratio(r, quiet, SPEEDS[1]):7.2f}" if quiet else ""
            lines.append(f"{engine:19s} {r['load_range']:>9s} {r['prefill_tokens_per_s']:14.1f} "
                         f"{r['decode_tokens_per_s']:13.1f} {vs}")
    ppl = results.get("llama3_np:perplexity")
    if ppl:
        cpp = results.get("llama.cpp:F32")
        vs = f"; / llama.cpp F32's prefill {ratio(ppl, cpp, PERPLEXITY, SPEEDS[0]):.2f}" if cpp else ""
        vs += f"; / llama3_np float32's prefill {ratio(ppl, quiet, PERPLEXITY, SPEEDS[0]):.2f}" if quiet else ""
        lines.append(f"perplexity ({ppl['version']}; load average {ppl['load_range']}): "
                     f"{ppl[PERPLEXITY]:.1f} tok/s{vs} (PPL {ppl['ppl']:.1f} on the synthetic ids)")
    if limits:
        residencies = dict(ours, **{e: results[e] for e in ("llama3_np:gguf",) if e in results})
        for engine, o in residencies.items():
            products_ms = limits["decode_products_ms"].get({"llama3_np:bfloat16": "bfloat16", "llama3_np:gguf": "Q8_0"}
                                                           .get(engine, "float32"))
            if products_ms is None:
                continue
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
    if any(e.partition(":")[2] in QUANTIZED for e in results):
        lines.append("llama.cpp on quantized GGUFs runs with use_extra_bufts off (llama-cpp-python's model parameter): "
                     "on this CPU its extra buffer types (AMX tiles, repacked weights) die with an illegal instruction")
    lines += [f"{engine}: {note}" for engine, note in notes.items()]
    lines += targets(results, limits, config, args)
    return "\n".join(lines)


def shape_of(config) -> str:
    """The released shape `config` has (tools/make_random_checkpoint.py's SHAPES), else "default"."""
    from make_random_checkpoint import SHAPES

    key = lambda c: (c.dim, c.n_layers, c.ffn_dim, c.n_heads, c.n_kv_heads, c.vocab_size)  # noqa: E731
    return next((name for name, c in SHAPES.items() if key(c) == key(config)), "default")


def targets(results: dict, limits: Optional[dict], config, args) -> list[str]:
    """Issue #22's targets for this model whose figures this run has: figure, met or not, and for
    one not met the bound this machine's limits set (tok/s the step could reach if it did nothing
    but that), as a multiple of the same reference's median."""
    shape = shape_of(config)
    get = results.get
    f32, bf16, cpp32, cppbf16 = get("llama3_np:float32"), get("llama3_np:bfloat16"), get("llama.cpp:F32"), get("llama.cpp:BF16")
    dec, pre = SPEEDS[1], SPEEDS[0]
    rows = []

    def bounds(itemsize, products: Optional[str], convert: bool = False, prefill: bool = False) -> dict:
        """tok/s each limit alone allows: name -> tok/s."""
        if not limits:
            return {}
        if prefill:
            return {"sgemm": limits["sgemm_gflop_s"] * 1e9 / (prefill_flops(config, args.prompt) / args.prompt)}
        per_token = decode_bytes_per_token(config, itemsize, args.prompt, args.new)
        out = {"read bandwidth": limits["bandwidth_gb_s"] * 1e9 / per_token}
        if convert:
            out["conversion by halves"] = limits["conversion_gb_s"].get("halves", 0) * 1e9 / per_token
        if products and products in limits["decode_products_ms"]:
            out[f"{products} products alone"] = 1e3 / limits["decode_products_ms"][products]
        return out

    def batch_bounds() -> dict:
        """tok/s over the batch if a step only read the float32 weights once for all sequences, or
        only made its products at the sgemm rate."""
        if not limits:
            return {}
        per_step = decode_bytes_per_token(config, 4, args.batch_prompt, args.batch_new)
        return {"read bandwidth (one read a step)": args.batch * limits["bandwidth_gb_s"] * 1e9 / per_step,
                "sgemm": limits["sgemm_gflop_s"] * 1e9 / prefill_flops(config, 1)}

    def add(target: str, figure: Optional[float], goal: float, text: str, limits_tok_s: dict, reference: Optional[float],
            below: bool = False):
        if figure is None:
            return
        met = figure <= goal if below else figure >= goal
        bound = ""
        if not met and limits_tok_s:
            bound = "; ".join(f"{k} {v:.1f} tok/s" + (f" = {v / reference:.2f}x" if reference else "")
                              for k, v in limits_tok_s.items())
        rows.append((target, text, "met" if met else "not met", bound))

    if shape == "default":
        if f32 and cpp32:
            r = ratio(f32, cpp32, dec)
            add("default model decode >= 1.0x llama.cpp F32", r, 1.0,
                f"{f32[dec]:.1f} / {cpp32[dec]:.1f} tok/s, paired {r:.2f}x", bounds(4, "float32"), cpp32[dec])
            r = ratio(f32, cpp32, pre)
            add("default model prefill >= 1.2x llama.cpp F32", r, 1.2,
                f"{f32[pre]:.1f} / {cpp32[pre]:.1f} tok/s, paired {r:.2f}x", bounds(4, None, prefill=True), cpp32[pre])
        for engine, goal in (("llama3_np:busy1", 0.5), ("llama3_np:busy2", 0.3)):
            if get(engine) and f32:
                r = ratio(results[engine], f32, dec)
                n, cores, t = BUSY[engine], os.cpu_count() or 1, args.threads
                # The cores llama3_np's busy threads get when the kernel shares them fairly among
                # its t threads and the n competitors, over the cores it has when quiet.
                share = min(t, cores * t / (t + n)) / min(t, cores)
                add(f"decode beside {n} CPU-bound process{'es' if n > 1 else ''} >= {goal}x quiet", r, goal,
                    f"{results[engine][dec]:.1f} / {f32[dec]:.1f} tok/s, paired {r:.2f}x",
                    {f"fair share of the {cores} cores, {share:.2f} of quiet": share * f32[dec]}, f32[dec])
    if shape == "llama3.2-1b":
        b = bounds(2, "bfloat16", convert=True)
        if bf16 and cpp32:
            r = ratio(bf16, cpp32, dec)
            add("1B bfloat16 decode >= 1.0x llama.cpp F32", r, 1.0, f"{bf16[dec]:.2f} / {cpp32[dec]:.2f} tok/s, paired {r:.2f}x",
                b, cpp32[dec])
        if bf16 and cppbf16:
            r = ratio(bf16, cppbf16, dec)
            add("1B bfloat16 decode >= 0.6x llama.cpp BF16", r, 0.6,
                f"{bf16[dec]:.2f} / {cppbf16[dec]:.2f} tok/s, paired {r:.2f}x", b, cppbf16[dec])
        if f32 and cpp32:
            r = ratio(f32, cpp32, dec)
            add("1B float32 decode >= 1.1x llama.cpp F32", r, 1.1, f"{f32[dec]:.2f} / {cpp32[dec]:.2f} tok/s, paired {r:.2f}x",
                bounds(4, "float32"), cpp32[dec])
        if get("llama3_np:batch") and f32:
            batch = results["llama3_np:batch"]
            r = ratio(batch, f32, dec)
            step_ms, single_ms = 1e3 * args.batch / batch[dec], 1e3 / f32[dec]
            add(f"1B batched decode of {args.batch} >= 5x single", r, 5.0,
                f"{batch[dec]:.2f} / {f32[dec]:.2f} tok/s, paired {r:.2f}x (a step of {args.batch} rows {step_ms:.0f} ms, "
                f"of 1 row {single_ms:.0f} ms)", batch_bounds(), f32[dec])
        if get("llama3_np:perplexity") and cpp32:
            ppl = results["llama3_np:perplexity"]
            r = ratio(ppl, cpp32, PERPLEXITY, pre)
            add("perplexity throughput >= 1.0x llama.cpp F32 prefill", r, 1.0,
                f"{ppl[PERPLEXITY]:.1f} / {cpp32[pre]:.1f} tok/s, paired {r:.2f}x", bounds(4, None, prefill=True), cpp32[pre])
        if get("llama3_np:gguf") and cpp32:
            q8 = results["llama3_np:gguf"]
            r = ratio(q8, cpp32, dec)
            cpp_q8 = get("llama.cpp:Q8_0")
            add("1B Q8_0 decode (--dtype gguf) >= 1.0x llama.cpp F32", r, 1.0,
                f"{q8[dec]:.2f} / {cpp32[dec]:.2f} tok/s, paired {r:.2f}x"
                + (f" (llama.cpp on the same Q8_0 file: {cpp_q8[dec]:.2f} tok/s)" if cpp_q8 else ""),
                bounds(Q8_0_ITEMSIZE, "Q8_0"), cpp32[dec])
    if shape == "llama3.1-8b" and bf16:
        add("8B bfloat16 decode >= 1.5 tok/s", bf16[dec], 1.5, f"{bf16[dec]:.2f} tok/s", bounds(2, "bfloat16", convert=True),
            None)
        gib = bf16["peak_rss_mb"] / 1024  # ru_maxrss is in KiB, so peak_rss_mb is MiB
        add("8B bfloat16 peak RSS <= 17 GiB", gib, 17.0, f"{gib:.1f} GiB", {}, None, below=True)
    if not rows:
        return []
    name = {"default": "the default model (or any model not of a released shape)", "llama3.2-1b": "the Llama 3.2 1B shape",
            "llama3.1-8b": "the Llama 3.1 8B shape"}.get(shape, shape)
    out = [f"targets of issue #22 for {name}, from this run (a bound: the tok/s that limit alone allows, "
           "and its multiple of the reference's median):", "| target | figure | | bound where not met |", "|---|---|---|---|"]
    return out + [f"| {t} | {f} | {m} | {b} |" for t, f, m, b in rows]


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
    p.add_argument("--ppl-windows", type=int, default=4, metavar="W",
                   help="windows of --prompt tokens that llama3_np:perplexity scores (default 4)")
    p.add_argument("--ppl-per-pass", type=int, default=1, metavar="K",
                   help="windows a forward pass in llama3_np:perplexity (default 1, as `perplexity`)")
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
