"""`llama3-np bench`: the work it divides by (bytes per decoded token, FLOPs per prompt token) and the
command itself on a tiny checkpoint. Nothing here is timed: speeds are only checked for consistency
with the limits and fractions the command reports."""

import json
from pathlib import Path

import numpy as np
import pytest

from llama3_np.xcheck import bench
from llama3_np.formats.checkpoint import save_hf_checkpoint
from llama3_np.formats.gguf_file import GGUFFile
from llama3_np.formats.gguf_import import gguf_config
from llama3_np.cli import main
from llama3_np.config import RopeScaling
from llama3_np.model import forward
from tests.checkpoint_builders import random_weights, tiny_config

SMOLLM2_135M = tiny_config(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536,
                           vocab_size=49152, rope_theta=100000.0, rope_scaling=None, max_seq_len=8192,
                           tie_embeddings=True)
LLAMA32_1B = tiny_config(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, ffn_dim=8192,
                         vocab_size=128256, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), tie_embeddings=True)
LLAMA31_8B = tiny_config(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336,
                         vocab_size=128256, tie_embeddings=False)


@pytest.mark.parametrize("config, published", [(SMOLLM2_135M, 134_515_008), (LLAMA32_1B, 1_235_814_400),
                                               (LLAMA31_8B, 8_030_261_248)])
def test_weight_bytes_match_published_parameter_counts(config, published):
    assert bench.weight_bytes(config, 4) == 4 * published
    assert bench.weight_bytes(config, 2) == 2 * published


def count_matrix_params(config):
    """Parameters of every matrix a token is multiplied by (all but the embedding lookup)."""
    D, H, KV, Dh, F = config.dim, config.n_heads, config.n_kv_heads, config.head_dim, config.ffn_dim
    shapes = [(H * Dh, D), (KV * Dh, D), (KV * Dh, D), (D, H * Dh), (F, D), (D, F), (F, D)]
    return config.n_layers * sum(a * b for a, b in shapes), config.vocab_size * D


@pytest.mark.parametrize("config", [SMOLLM2_135M, LLAMA32_1B, LLAMA31_8B])
def test_prefill_flops_count_every_product(config):
    T = 512
    layer_params, output_params = count_matrix_params(config)
    # Causal attention, spelled out: query t scores t + 1 keys, then sums t + 1 values, per head.
    attention = sum(2 * 2 * config.n_heads * config.head_dim * (t + 1) for t in range(T))
    expected = 2 * T * layer_params + config.n_layers * attention + 2 * output_params
    assert bench.prefill_flops(config, T) == expected


@pytest.mark.parametrize("config", [SMOLLM2_135M, LLAMA31_8B])
def test_decode_bytes_are_every_matrix_norm_and_the_cached_keys_and_values(config):
    prompt, new = 512, 128
    layer_params, output_params = count_matrix_params(config)
    norms = (2 * config.n_layers + 1) * config.dim
    # Step s feeds generated token s (s = 1 .. new-1) into a cache holding prompt + s - 1 slots
    # and attends to prompt + s of them.
    attended = [prompt + s for s in range(1, new)]
    kv = [2 * config.n_layers * config.n_kv_heads * config.head_dim * 4 * n for n in attended]
    expected = (layer_params + output_params + norms) * 4 + np.mean(kv)
    assert bench.decode_bytes_per_token(config, 4, prompt, new) == pytest.approx(expected, rel=1e-12)


def test_fraction_of_a_limit():
    # 538 MB per token at 42 tok/s from a 30 GB/s bus is 0.7532 of it.
    assert bench.fraction(538e6, 42.0, 30e9) == pytest.approx(0.7532)
    assert bench.fraction(230e6, 400.0, 145e9) == pytest.approx(0.63448, rel=1e-4)


@pytest.fixture
def tiny_checkpoint(tmp_path, monkeypatch):
    # Small limit measurements keep the test quick; they are still real measurements.
    monkeypatch.setattr(bench, "BANDWIDTH_MATRIX", (256, 256))
    monkeypatch.setattr(bench, "READ_ARRAY_BYTES", 1 << 16)
    monkeypatch.setattr(bench, "READ_ROW", 64)
    monkeypatch.setattr(bench, "READ_BLOCK_ROWS", 16)
    monkeypatch.setattr(bench, "SGEMM_SHAPE", (16, 32, 32))
    config = tiny_config(vocab_size=64, max_seq_len=64)
    weights = random_weights(config, seed=3)
    save_hf_checkpoint(tmp_path, config, weights)
    return tmp_path, config, weights


def greedy_ids(weights, config, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(forward(weights, config, ids)[-1])))
    return ids[len(prompt):]


@pytest.mark.parametrize("dtype, threads", [("float32", 1), ("bfloat16", 2), ("float32", 3)])
def test_bench_command_reports_consistent_numbers(tiny_checkpoint, capsys, dtype, threads):
    path, config, weights = tiny_checkpoint
    assert main(["bench", "-m", str(path), "--prompt", "9", "--new", "5", "--runs", "2",
                 "--dtype", dtype, "-t", str(threads), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["prompt_tokens"], r["new_tokens"], r["runs"], r["dtype"]) == (9, 5, 2, dtype)
    assert r["threads"] == threads
    # Greedy decoding of the synthetic prompt, as a cache-free forward pass computes it.
    prompt = bench.synthetic_prompt(9, config.vocab_size)
    assert r["ids"] == greedy_ids(weights, config, prompt, 5)
    itemsize = 4 if dtype == "float32" else 2
    assert r["weight_mb"] * 1e6 == bench.weight_bytes(config, itemsize)
    assert r["decode_bytes_per_token"] == bench.decode_bytes_per_token(config, itemsize, 9, 5)
    assert r["prefill_flops_per_token"] == bench.prefill_flops(config, 9) / 9
    assert r["kv_cache_mb"] * 1e6 == bench.kv_cache_bytes(config, 14)
    for speed, work, limit, share in [
            ("decode_tokens_per_s", "decode_bytes_per_token", "bandwidth_gb_s", "decode_fraction"),
            ("decode_tokens_per_s", "decode_bytes_per_token", "matvec_gb_s", "decode_fraction_of_matvec"),
            ("prefill_tokens_per_s", "prefill_flops_per_token", "sgemm_gflop_s", "prefill_fraction")]:
        assert r[speed] > 0 and r[limit] > 0
        assert r[share] == pytest.approx(r[work] * r[speed] / (r[limit] * 1e9), rel=1e-9)
    assert r["load_s"] > 0 and r["peak_rss_mb"] > 0


def test_bench_in_a_ggufs_own_blocks_counts_the_bytes_the_blocks_hold(capsys):
    """--dtype gguf holds each tensor in its own type (here Q8_0 matrices, F32 norms): the weights'
    size and the bytes a decode step reads are the file's tensors' bytes, not 4 per value."""
    path = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints" / "gguf_q8_0.gguf"
    assert main(["bench", "-m", str(path), "--prompt", "4", "--new", "2", "--runs", "1",
                 "--dtype", "gguf", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    file = GGUFFile(path)
    config, _ = gguf_config(path, file)
    held = sum(t.nbytes for name, t in file.tensors.items() if name != "rope_freqs.weight")
    matrices = held - file.tensors["token_embd.weight"].nbytes
    assert r["dtype"] == "gguf" and r["weight_mb"] * 1e6 == held
    assert r["decode_bytes_per_token"] == bench.decode_bytes_per_token(config, 4, 4, 2, matrices)


def test_bench_report_names_every_figure(tiny_checkpoint, capsys):
    path, _, _ = tiny_checkpoint
    assert main(["bench", "-m", str(path), "--prompt", "4", "--new", "3", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    for word in ("load", "prefill", "decode", "peak RSS", "of the sgemm limit", "of the read bandwidth",
                 "bfloat16 conversion: ", "bit shift", "ml_dtypes cast", "halves",
                 "of the matrix-vector rate", "read bandwidth", "float32 matrix-vector", "GFLOP/s", "threads"):
        assert word in out, f"{word!r} missing from:\n{out}"


@pytest.mark.parametrize("flags, message", [
    (["--new", "1"], "--new: new_tokens must be at least 2"),
    (["--prompt", "0"], "--prompt: prompt_tokens must be at least 1"),
    (["--runs", "0"], "--runs: runs must be at least 1"),
    (["--prompt", "60", "--new", "10"], "exceeds the model's context of 64"),
    (["-t", "0"], "-t/--threads: takes a number of threads >= 1, got '0'"),
    (["--threads", "two"], "-t/--threads: takes a number of threads >= 1, got 'two'"),
])
def test_bench_flags_out_of_range_are_clear_errors(tiny_checkpoint, capsys, flags, message):
    path, _, _ = tiny_checkpoint
    assert main(["bench", "-m", str(path)] + flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
