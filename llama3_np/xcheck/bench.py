"""`llama3-np bench`: load, prefill and decode speed, measured against this machine's own limits.

Decoding one token is a matrix-vector product over every weight, so its speed is bound by how fast
memory can be read; a prefill is a chain of matrix products, bound by the sgemm rate. The limits
are measured in the same process, on the same threads, right after the model runs, and each
speed is reported as a fraction of its limit:

    decode fraction  = bytes read per decoded token × decode tok/s ÷ read bandwidth
    prefill fraction = FLOPs per prompt token × prefill tok/s ÷ sgemm rate

The read bandwidth is what the memory delivers to all threads (row sums of a 1 GiB array); the
float32 matrix-vector rate (x · Wᵀ through llama3_np's products) is reported beside it, with the
decode fraction of that too: it is what NumPy's BLAS makes of the bandwidth, and it is lower.

bfloat16 residency converts every weight to float32 block by block as it multiplies, so the rate
of that conversion bounds its decode too: `bench` prints the conversion products chose for prefills
(bit shift or ml_dtypes' cast, timed at the first bfloat16 product), that decode steps convert by
halves (`products.halves_bfloat16`), and the rate of each, in bytes of bfloat16 read per second on
all threads, blocks of the size products convert.

The prompt is a fixed synthetic list of token ids (no tokenizer needed); every run is greedy, has
no stop token, and starts from an empty KV cache. Speeds are medians over `runs` runs after a warm-up.
"""

from __future__ import annotations

import itertools
import os
import resource
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..config import ComputeMode, ModelConfig
from ..errors import Llama3Error, ParameterError
from ..generation import Session
from ..products import (BFLOAT16_CONVERSIONS, HALVES_BLOCK_BYTES, bfloat16_conversion, conversion_rows, get_threads,
                        halves_bfloat16, linear, parallel)
from ..sampling import SamplingParams

# The limits (each the best of several runs): row sums of a float32 array 32 times the size of a
# large L3 cache (so it is read from memory, like a model's weights), in rows of READ_ROW elements
# and blocks of READ_BLOCK_ROWS rows shared by the threads; a float32 matrix-vector product over a
# matrix 8 times that cache; a float32 matrix product of the shape of a 512-token prefill through a
# 2048-wide projection.
READ_ARRAY_BYTES = 1 << 30
READ_ROW, READ_BLOCK_ROWS = 4096, 512  # blocks of 8 MiB
BANDWIDTH_MATRIX = (8192, 8192)  # 256 MiB
SGEMM_SHAPE = (512, 2048, 2048)  # [M, K] @ [K, N]
CONVERSION_MATRIX = (32768, 4096)  # 256 MiB of bfloat16, 8 times that cache


# ---------------------------------------------------------------------------------------------
# The arithmetic


def weight_bytes(config: ModelConfig, itemsize: int) -> int:
    """Bytes of the weights, the output projection counted once when it is tied."""
    D, F, V = config.dim, config.ffn_dim, config.vocab_size
    H, KV, Dh = config.n_heads, config.n_kv_heads, config.head_dim
    per_layer = D * (H + 2 * KV) * Dh + H * Dh * D + 3 * D * F + 2 * D
    params = config.n_layers * per_layer + V * D + D + (0 if config.tie_embeddings else V * D)
    return params * itemsize


def held_bytes(weights: dict, tied: bool) -> tuple[int, int]:
    """(all weights, all but the embedding): the bytes the arrays or ggml blocks actually hold, a
    tied output projection counted once; for a residency whose bytes per value vary by tensor
    (`--dtype gguf`: Q4_1 matrices, a Q8_0 embedding, F32 norms)."""
    total = sum(w.nbytes for w in {id(w): w for w in weights.values()}.values())
    return total, total - (0 if tied else weights["tok_embeddings.weight"].nbytes)


def kv_cache_bytes(config: ModelConfig, tokens: int) -> int:
    """Bytes of a float32 KV cache of `tokens` slots: keys and values of every layer."""
    return 2 * config.n_layers * config.n_kv_heads * tokens * config.head_dim * 4


def decode_bytes_per_token(config: ModelConfig, itemsize: int, prompt: int, new: int,
                           matrices: int | None = None) -> float:
    """Bytes one decode step reads, averaged over the steps of a run of `new` generated tokens.

    Every matrix of every layer and the output projection; one embedding row (negligible, not
    counted); the rmsnorm weights; the keys and values cached so far. The first generated token
    comes from the prefill, so the steps feed tokens at cache lengths prompt .. prompt + new - 2
    and attend to one more slot than that. `matrices`: the bytes of all but the embedding when
    they are not `itemsize` per value (a GGUF's own blocks, `held_bytes`).
    """
    D, V = config.dim, config.vocab_size
    if matrices is None:
        matrices = weight_bytes(config, itemsize) - (0 if config.tie_embeddings else V * D * itemsize)
    steps = max(new - 1, 1)
    mean_attended = prompt + 1 + (steps - 1) / 2
    return matrices + kv_cache_bytes(config, 1) * mean_attended


def prefill_flops(config: ModelConfig, T: int) -> float:
    """Multiply-adds × 2 of a prefill of T tokens into an empty cache, logits of the last only.

    Projections: q, k, v, o and the three feed-forward matrices for every token. Attention: only
    the causal part (query t reads t + 1 keys), for scores and for the weighted sum of values.
    Norms, rope and softmax are O(T·D) and not counted.
    """
    D, F, V = config.dim, config.ffn_dim, config.vocab_size
    H, KV, Dh = config.n_heads, config.n_kv_heads, config.head_dim
    projections = 2 * T * D * ((H + 2 * KV) * Dh + H * Dh + 3 * F)
    attention = 2 * 2 * H * Dh * (T * (T + 1) // 2)
    return config.n_layers * (projections + attention) + 2 * D * V


def fraction(work_per_token: float, tokens_per_second: float, limit_per_second: float) -> float:
    """The share of a limit (bytes/s or FLOP/s) that `tokens_per_second` reaches."""
    return work_per_token * tokens_per_second / limit_per_second


# ---------------------------------------------------------------------------------------------
# The measurements


def _best_seconds(f, repeats: int) -> float:
    """The fastest of `repeats` calls after a warm-up: a limit is the best the machine does (other
    processes' memory traffic only ever slows it)."""
    f()  # warm-up: pages faulted in, BLAS threads started
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_read_bandwidth(repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: every row of a float32 [n, READ_ROW] array summed (a product with
    a vector of ones, the fastest way NumPy reads memory), its blocks shared by llama3_np's threads."""
    rows = max(READ_BLOCK_ROWS, READ_ARRAY_BYTES // (4 * READ_ROW))
    a = np.ones((rows, READ_ROW), dtype=np.float32)
    ones = np.ones(READ_ROW, dtype=np.float32)
    sums = np.empty(rows, dtype=np.float32)

    def block(i: int) -> None:
        part = slice(i * READ_BLOCK_ROWS, (i + 1) * READ_BLOCK_ROWS)
        np.dot(a[part], ones, out=sums[part])  # np.dot runs without the GIL

    n_blocks = -(-rows // READ_BLOCK_ROWS)
    return a.nbytes / _best_seconds(lambda: parallel(block, n_blocks), repeats)


def measure_matvec(repeats: int = 9) -> float:
    """float32 matrix-vector rate in bytes of matrix per second: [1, n] · [m, n]ᵀ through
    llama3_np's products, the form of every product of a decode step."""
    shape = BANDWIDTH_MATRIX
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape, dtype=np.float32)
    x = rng.standard_normal((1, shape[1]), dtype=np.float32)
    return w.nbytes / _best_seconds(lambda: linear(x, w), repeats)


def measure_sgemm(repeats: int = 9) -> float:
    """float32 matrix product rate in FLOP/s, [M, K] · [N, K]ᵀ through llama3_np's products, as a
    prefill's projections."""
    M, K, N = SGEMM_SHAPE
    rng = np.random.default_rng(0)
    a = rng.standard_normal((M, K), dtype=np.float32)
    b = rng.standard_normal((N, K), dtype=np.float32)
    return 2 * M * K * N / _best_seconds(lambda: linear(a, b), repeats)


def measure_conversions(repeats: int = 5) -> dict[str, float]:
    """bfloat16 -> float32 conversion rate of each of products' conversions, in bytes of bfloat16 read
    per second: a matrix read from memory, converted block by block into each thread's buffer, the
    blocks shared by llama3_np's threads, as bfloat16 products convert (without their products);
    "halves" is a decode step's conversion, in its blocks (`products.halves_bfloat16`)."""
    from ..dtypes import bfloat16

    n_out, n_in = CONVERSION_MATRIX
    rng = np.random.default_rng(0)
    w = rng.integers(0, 1 << 16, size=CONVERSION_MATRIX, dtype=np.uint16).view(bfloat16())
    rows = conversion_rows(n_out, n_in)
    n_blocks = -(-n_out // rows)
    buffers = threading.local()
    rates = {}
    for name, convert in BFLOAT16_CONVERSIONS.items():
        def block(i: int) -> None:
            if not hasattr(buffers, "block"):
                buffers.block = np.empty((rows, n_in), dtype=np.float32)
            part = w[i * rows:(i + 1) * rows]
            convert(part, buffers.block[:part.shape[0]])

        rates[name] = w.nbytes / _best_seconds(lambda: parallel(block, n_blocks), repeats)
    rows = max(1, HALVES_BLOCK_BYTES // (4 * n_in))

    def by_halves(i: int) -> None:
        if not hasattr(buffers, "halves"):
            buffers.halves = np.empty((2, rows, n_in // 2), dtype=np.float32)
        part = w[i * rows:(i + 1) * rows]
        halves_bfloat16(part, buffers.halves[0, :part.shape[0]], buffers.halves[1, :part.shape[0]])

    rates["halves"] = w.nbytes / _best_seconds(lambda: parallel(by_halves, -(-n_out // rows)), repeats)
    return rates


def peak_rss_mb() -> float:
    """The largest resident memory of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_prompt(n: int, vocab_size: int) -> list[int]:
    """A fixed, repeatable prompt of n token ids spread over the vocabulary."""
    return [(7919 * i + 11) % vocab_size for i in range(n)]


@dataclass
class BenchResult:
    model: str
    dtype: str
    threads: int  # llama3_np's threads (NumPy's BLAS held to one)
    load_average: float  # 1-minute load average when the bench started; figures from a busy
    cpus: int            # machine (load near or above the CPU count) are not comparable
    prompt_tokens: int
    new_tokens: int
    runs: int
    load_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    peak_rss_mb: float
    weight_mb: float  # float32 residency: the float32 bytes; bfloat16: the stored bytes
    kv_cache_mb: float
    decode_bytes_per_token: float
    prefill_flops_per_token: float
    bandwidth_gb_s: float  # the read bandwidth
    matvec_gb_s: float     # the float32 matrix-vector rate
    sgemm_gflop_s: float
    decode_fraction: float  # of the read bandwidth
    decode_fraction_of_matvec: float
    prefill_fraction: float
    bfloat16_conversion: str  # the one products use (timed at the first bfloat16 product)
    conversion_gb_s: dict  # every conversion's rate, GB of bfloat16 read per second on all threads
    ml_dtypes_version: str
    ids: list[int]  # the greedy ids of the last run, to compare across versions


def run_generations(session_factory, prompt: list[int], new: int, runs: int, step=lambda: None):
    """Median prefill and decode speeds of `runs` greedy generations after one short warm-up;
    `step()` after each generation."""
    greedy = SamplingParams(temperature=0)
    rng = np.random.default_rng(0)
    session_factory().generate(prompt[:16], greedy, rng, max_new=min(new, 4)).run()
    step()
    prefill, decode, ids = [], [], []
    for _ in range(runs):
        out = session_factory().generate(prompt, greedy, rng, max_new=new).run()
        prefill.append(out.prefill_tokens_per_second)
        decode.append(out.decode_tokens_per_second)
        ids = out.ids
        step()
    return statistics.median(prefill), statistics.median(decode), ids


def bench(path, dtype: Optional[str] = None, prompt_tokens: int = 512, new_tokens: int = 128, runs: int = 3,
          rope_factor=None, progress: Optional[Callable[[int, int], None]] = None, compute: str = "float32",
          convention: str = "transformers") -> BenchResult:
    """Load the checkpoint folder `path` and measure it (see the module docstring). progress:
    called with (done, total) steps: the load, the warm-up, each run, each limit measured and the
    bfloat16 conversions. compute, convention: the compute mode (`config.ComputeMode`), which
    decides the residency when `dtype` is None (`load.residency`)."""
    from ..formats.checkpoint import load_checkpoint, scan_checkpoint
    from ..load import checkpoint_for, residency, stored_residency

    mode = ComputeMode.of(compute, convention)
    dtype = residency(dtype, mode)

    if prompt_tokens < 1:
        raise ParameterError("prompt_tokens", f"prompt_tokens must be at least 1 token, got {prompt_tokens}")
    if new_tokens < 2:
        raise ParameterError("new_tokens", f"new_tokens must be at least 2 (the first token comes from the prefill), got {new_tokens}")
    if runs < 1:
        raise ParameterError("runs", f"runs must be at least 1, got {runs}")
    load_average = os.getloadavg()[0]
    steps = itertools.count(1)
    total = 1 + 1 + runs + 4

    def step():
        if progress is not None:
            progress(next(steps), total)

    t0 = time.perf_counter()
    index = scan_checkpoint(path, rope_factor=rope_factor)
    if mode.dtype == "llamacpp":
        dtype = stored_residency(dtype, index.format)
    checkpoint = checkpoint_for(load_checkpoint(index, dtype=dtype), mode)
    load_s = time.perf_counter() - t0
    step()
    config = checkpoint.config
    ctx = prompt_tokens + new_tokens
    if ctx > config.max_seq_len:
        raise Llama3Error(f"prompt_tokens + new_tokens = {ctx} tokens exceeds the model's context of "
                          f"{config.max_seq_len}")
    prompt = synthetic_prompt(prompt_tokens, config.vocab_size)
    prefill, decode, ids = run_generations(lambda: Session(checkpoint.weights, config, ctx, compute=mode), prompt,
                                           new_tokens, runs, step)
    rss = peak_rss_mb()  # before the limit measurements allocate their own matrices
    itemsize = max(w.itemsize for w in checkpoint.weights.values())
    bandwidth = measure_read_bandwidth()
    step()
    matvec = measure_matvec()
    step()
    sgemm = measure_sgemm()
    step()
    conversions = measure_conversions()
    step()
    import ml_dtypes  # imported by now: the conversions made bfloat16 arrays
    weight_total, matrices = weight_bytes(config, itemsize), None
    if checkpoint.dtype == "gguf":
        weight_total, matrices = held_bytes(checkpoint.weights, config.tie_embeddings)
    bytes_per_token = decode_bytes_per_token(config, itemsize, prompt_tokens, new_tokens, matrices)
    flops_per_token = prefill_flops(config, prompt_tokens) / prompt_tokens
    return BenchResult(
        model=str(checkpoint.path), dtype=checkpoint.dtype, threads=get_threads(), load_average=load_average,
        cpus=os.cpu_count() or 1, prompt_tokens=prompt_tokens,
        new_tokens=new_tokens, runs=runs, load_s=load_s, prefill_tokens_per_s=prefill,
        decode_tokens_per_s=decode, peak_rss_mb=rss, weight_mb=weight_total / 1e6,
        kv_cache_mb=kv_cache_bytes(config, ctx) / 1e6, decode_bytes_per_token=bytes_per_token,
        prefill_flops_per_token=flops_per_token, bandwidth_gb_s=bandwidth / 1e9, matvec_gb_s=matvec / 1e9,
        sgemm_gflop_s=sgemm / 1e9, decode_fraction=fraction(bytes_per_token, decode, bandwidth),
        decode_fraction_of_matvec=fraction(bytes_per_token, decode, matvec),
        prefill_fraction=fraction(flops_per_token, prefill, sgemm), bfloat16_conversion=bfloat16_conversion(),
        conversion_gb_s={name: rate / 1e9 for name, rate in conversions.items()},
        ml_dtypes_version=ml_dtypes.__version__, ids=ids)


def report(r: BenchResult) -> str:
    return "\n".join([
        f"model    {r.model} ({r.dtype} residency, {r.weight_mb:.0f} MB of weights)",
        f"threads  {r.threads} (NumPy's BLAS held to one); machine load {r.load_average:.2f} on {r.cpus} CPUs at the start"
        + (" (busy: these figures are not comparable)" if r.load_average > r.cpus else ""),
        f"load     {r.load_s:.2f} s",
        f"prefill  {r.prefill_tokens_per_s:8.1f} tok/s  {r.prompt_tokens} tokens, median of {r.runs}; "
        f"{r.prefill_fraction:.2f} of the sgemm limit ({r.prefill_flops_per_token / 1e6:.0f} MFLOP per token)",
        f"decode   {r.decode_tokens_per_s:8.1f} tok/s  {r.new_tokens} tokens, median of {r.runs}; "
        f"{r.decode_fraction:.2f} of the read bandwidth, {r.decode_fraction_of_matvec:.2f} of the "
        f"matrix-vector rate ({r.decode_bytes_per_token / 1e6:.0f} MB read per token)",
        f"peak RSS {r.peak_rss_mb:.0f} MB (KV cache {r.kv_cache_mb:.0f} MB)",
        f"limits   read bandwidth {r.bandwidth_gb_s:.1f} GB/s (row sums of a {READ_ARRAY_BYTES >> 20} MiB array); "
        f"float32 matrix-vector {r.matvec_gb_s:.1f} GB/s ({BANDWIDTH_MATRIX[0] * BANDWIDTH_MATRIX[1] * 4 >> 20} MiB "
        f"matrix); sgemm {r.sgemm_gflop_s:.1f} GFLOP/s ({'x'.join(map(str, SGEMM_SHAPE))}); "
        f"all on {r.threads} threads",
        f"bfloat16 conversion: decode steps by halves, prefills by {r.bfloat16_conversion} (the faster at the "
        "first bfloat16 product); "
        + ", ".join(f"{name} {rate:.1f} GB/s" for name, rate in r.conversion_gb_s.items())
        + f" of bfloat16 on {r.threads} threads (ml_dtypes {r.ml_dtypes_version})",
    ])
