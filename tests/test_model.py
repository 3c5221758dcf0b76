"""Properties of the model functions that hold whatever the weights: the KV cache changes nothing,
grouped-query attention equals attention with repeated key/value heads, rope is a rotation that
depends only on relative position, bfloat16 residency changes nothing."""

import math

import ml_dtypes
import numpy as np
import pytest

from llama3_np import Llama3Error
from llama3_np.stages import Trace, stage_shapes
from llama3_np.model import (KVCache, causal_attention, forward, rmsnorm, rope, rope_cos_sin,
                             rope_frequencies, softmax)
from tests.helpers import assert_close, random_weights, tiny_config

TOKENS = np.array([5, 17, 99, 3, 64, 64, 12, 127, 0, 41, 8, 77])


# Prefill then decode against one forward: the same sums in another order. float32 and float64 by
# their rounding; bfloat16 and float16 by a few of their ulps where another order crosses a rounding
# boundary (one float16 ulp of a typical logit is NMSE ~2e-7).
CACHE_TOLERANCE = {"float32": 1e-10, "float64": 1e-24, "bfloat16": 1e-4, "float16": 1e-5}


@pytest.mark.parametrize("compute", list(CACHE_TOLERANCE))
@pytest.mark.parametrize("start", [0, 24_571])
def test_prefill_then_decode_equals_one_full_forward(start, compute):
    config = tiny_config()
    w = random_weights(config)
    full = forward(w, config, TOKENS, pos=start, compute=compute)
    cache = KVCache(config, len(TOKENS), compute)
    parts = [forward(w, config, TOKENS[:5], cache, pos=start)]
    for i in range(5, len(TOKENS)):
        parts.append(forward(w, config, TOKENS[i:i + 1], cache, pos=start + i))
    assert cache.length == len(TOKENS) and cache.k.dtype == cache.mode.storage and cache.k.dtype.name == compute
    assert full.dtype == cache.mode.work
    assert_close(np.concatenate(parts), full, f"logits, prefill 5 + decode, start {start}", CACHE_TOLERANCE[compute])


def test_an_unknown_compute_mode_or_a_cache_made_for_another_is_a_clear_error():
    config = tiny_config()
    w = random_weights(config)
    with pytest.raises(Llama3Error, match="compute must be one of float64, float32, bfloat16, float16, llamacpp, got 'float8'"):
        forward(w, config, TOKENS, compute="float8")
    with pytest.raises(Llama3Error, match="compute 'float64' needs a KV cache made for it"):
        forward(w, config, TOKENS, KVCache(config, len(TOKENS)), compute="float64")


def test_without_a_position_forward_continues_at_the_cache_length():
    """forward(tokens, cache) puts the first token at position cache.length: a prefill then decode
    steps with no `pos` give the logits of one full forward from position 0 (before, they restarted
    at 0 and attended to the cache with the wrong rotations)."""
    config = tiny_config()
    w = random_weights(config)
    full = forward(w, config, TOKENS)
    cache = KVCache(config, len(TOKENS))
    parts = [forward(w, config, TOKENS[:5], cache)]
    for i in range(5, len(TOKENS)):
        parts.append(forward(w, config, TOKENS[i:i + 1], cache))
    assert cache.length == len(TOKENS)
    assert_close(np.concatenate(parts), full, "logits, prefill 5 + decode without pos", 1e-10)
    # An explicit position still wins: the same tokens at position 0 on top of a cache are another input.
    cache = KVCache(config, len(TOKENS))
    forward(w, config, TOKENS[:5], cache)
    restarted = forward(w, config, TOKENS[5:6], cache, pos=0)
    assert np.abs(restarted - full[5:6]).max() > 1e-3


def test_cache_overflow_is_a_clear_error():
    config = tiny_config()
    w = random_weights(config)
    cache = KVCache(config, 4)
    forward(w, config, TOKENS[:3], cache)
    with pytest.raises(Llama3Error, match="holds 3 of 4 tokens; 2 more do not fit"):
        forward(w, config, TOKENS[3:5], cache, pos=3)


def test_token_outside_vocabulary_is_a_clear_error():
    config = tiny_config()
    with pytest.raises(Llama3Error, match=r"token id 128 is outside the vocabulary \(0..127\)"):
        forward(random_weights(config), config, [1, 128])


def test_grouped_query_attention_equals_repeated_heads():
    rng = np.random.default_rng(1)
    T, S, H, KV, Dh = 5, 9, 8, 2, 16
    q = rng.normal(size=(T, H, Dh)).astype(np.float32)
    keys = rng.normal(size=(KV, S, Dh)).astype(np.float32)
    values = rng.normal(size=(KV, S, Dh)).astype(np.float32)
    ours = causal_attention(q, keys, values)
    # Reference: every query head h gets its own copy of key/value head h // (H / KV), written as
    # an explicit loop in float64 with the causal mask spelled out.
    ref = np.zeros((T, H, Dh))
    for h in range(H):
        k, v = keys[h // (H // KV)].astype(np.float64), values[h // (H // KV)].astype(np.float64)
        for t in range(T):
            visible = S - T + t + 1
            s = k[:visible] @ q[t, h] / math.sqrt(Dh)
            p = np.exp(s - s.max())
            ref[t, h] = (p / p.sum()) @ v[:visible]
    assert_close(ours, ref, "grouped-query attention", 1e-12)


def test_softmax_of_masked_row_gives_zero_weight():
    p = softmax(np.array([[0.0, -np.inf, 1.0]], dtype=np.float32))
    assert p[0, 1] == 0 and abs(p.sum() - 1) < 1e-7


def test_rmsnorm_matches_its_equation():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 64)).astype(np.float32) * 5
    w = rng.normal(size=64).astype(np.float32)
    ref = x.astype(np.float64) / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + 1e-5) * w
    assert_close(rmsnorm(x, w, 1e-5), ref, "rmsnorm", 1e-13)


def test_rope_is_a_rotation_that_depends_only_on_relative_position():
    config = tiny_config()
    freqs = rope_frequencies(config)
    rng = np.random.default_rng(3)
    q = rng.normal(size=(1, 1, config.head_dim)).astype(np.float32)
    k = rng.normal(size=(1, 1, config.head_dim)).astype(np.float32)

    def rotated(x, p):
        cos, sin = rope_cos_sin(np.array([p]), freqs)
        return rope(x, cos, sin)

    assert abs(np.linalg.norm(rotated(q, 1234)) - np.linalg.norm(q)) < 1e-5
    # <rope(q, m), rope(k, n)> depends on m - n only (up to the float32 angle rounding at m, n).
    dots = [float(np.sum(rotated(q, m + 7) * rotated(k, m))) for m in (0, 100, 3000)]
    assert max(dots) - min(dots) < 1e-4 * np.linalg.norm(q) * np.linalg.norm(k), dots


def test_llama3_scaling_bands():
    """High-frequency pairs unchanged, low-frequency ones divided by the factor, blend between."""
    config = tiny_config(head_dim=128, rope_scaling=None)
    plain = rope_frequencies(config).astype(np.float64)
    scaled = rope_frequencies(tiny_config(head_dim=128)).astype(np.float64)
    wavelen = 2 * np.pi / plain
    high, low = wavelen < 8192 / 4, wavelen > 8192 / 1
    assert high.any() and low.any() and (~high & ~low).any()
    assert np.array_equal(scaled[high], plain[high])
    np.testing.assert_allclose(scaled[low], plain[low] / 32, rtol=1e-6)
    mid = ~high & ~low
    assert np.all((scaled[mid] < plain[mid]) & (scaled[mid] > plain[mid] / 32))


def test_bfloat16_residency_gives_the_same_logits():
    config = tiny_config(tie_embeddings=True)
    f32 = forward(random_weights(config, dtype=np.float32), config, TOKENS)
    bf16 = forward(random_weights(config, dtype=ml_dtypes.bfloat16), config, TOKENS)
    assert_close(bf16, f32, "logits, bfloat16 vs float32 residency", 1e-10)


def test_trace_records_every_stage_of_the_contract_in_model_order_with_its_shape():
    config = tiny_config()
    T, H, KV, Dh = 4, config.n_heads, config.n_kv_heads, config.head_dim
    trace = Trace()
    forward(random_weights(config), config, TOKENS[:4], trace=trace)
    expected = stage_shapes(config, T, probs=False)
    assert list(trace) == list(expected)
    assert {name: x.shape for name, x in trace.items()} == expected
    # The legend's symbols, spelled out for a few stages.
    assert expected["layers.1.q_rope"] == (T, H, Dh) and expected["layers.0.k"] == (T, KV, Dh)
    assert expected["layers.0.attn"] == (T, H * Dh) and expected["layers.0.ffn_hidden"] == (T, config.ffn_dim)
    everything = Trace(["*", "*.probs"])
    forward(random_weights(config), config, TOKENS[:4], trace=everything)
    assert {name: x.shape for name, x in everything.items()} == stage_shapes(config, T)
    assert list(everything) == list(stage_shapes(config, T))
    probs = Trace(["layers.1.probs"])
    forward(random_weights(config), config, TOKENS[:4], trace=probs)
    assert list(probs) == ["layers.1.probs"] and probs["layers.1.probs"].shape == (H, T, T)
    assert np.allclose(probs["layers.1.probs"].sum(-1), 1, atol=1e-6)


def test_keep_returns_its_input_and_refuses_a_name_outside_the_contract():
    trace, x = Trace(), np.ones((2, 3), np.float32)
    assert trace.keep("layers.0.h", x) is x and np.array_equal(trace["layers.0.h"], x)
    with pytest.raises(KeyError, match="'layers.0.hidden' is not a stage"):
        trace.keep("layers.0.hidden", x)


