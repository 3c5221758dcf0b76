"""Llama 3 inference as plain NumPy functions: the specification that runs.

Read top to bottom: embed -> (rmsnorm -> attention with rope -> residual -> rmsnorm -> swiglu ->
residual) x n_layers -> rmsnorm -> output projection. Every number comes from `ModelConfig`; this
module does no I/O, knows nothing of file formats, and leaves low-precision products (`linear`)
and argument checks (`checks`) to their own modules.

Dimensions, used in every shape comment:
    T   tokens in this call            D   model dim (config.dim)
    S   tokens attended to (cached + T) F   feed-forward dim (config.ffn_dim)
    H   query heads (config.n_heads)    KV  key/value heads (config.n_kv_heads)
    Dh  head dim (config.head_dim)      V   vocabulary size (config.vocab_size)

Weights use Meta's names (`layers.0.attention.wq.weight`, ...) and Meta's rope layout: dims 2i and
2i+1 of every head rotate together; float32 or bfloat16, compute float32. Each stage names its
source: the Llama 3 paper (arXiv 2407.21783), RMSNorm (1910.07467), RoFormer (2104.09864), GQA
(2305.13245), GLU variants (2002.05202), and the function of Meta's `llama-models` reference
(`models/llama3/model.py`) it matches. `keep(name, x)` records a named stage (`llama3_np.stages`)
and returns x.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np

from .checks import expect_shape, forward_arguments
from .config import ModelConfig
from .linear import as_float32, linear
from .stages import Keep, Trace, keep_nothing, scoped


def embed(tokens: np.ndarray, tok_embeddings: np.ndarray) -> np.ndarray:  # [T], [V, D] -> [T, D]
    """Row lookup: token id t becomes row t of the embedding matrix.

    Source: llama-models Transformer.tok_embeddings.
    """
    return as_float32(tok_embeddings[tokens])


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:  # [T, D], [D] -> [T, D]
    """x / sqrt(mean(x²) + eps) · weight, per row (no mean subtraction, no bias).

    Source: RMSNorm (arXiv 1910.07467); llama-models RMSNorm.
    """
    expect_shape(weight, x.shape[-1:], "rmsnorm weight")
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * as_float32(weight)


def rope_frequencies(config: ModelConfig) -> np.ndarray:  # -> [Dh/2]
    """The rotation frequency of each dim pair: θ^(-2i/Dh), i = 0 .. Dh/2-1, then "llama3" scaling.

    Llama 3.1+ scaling (config.rope_scaling) leaves short wavelengths (< original_context /
    high_freq_factor) alone, divides long ones (> original_context / low_freq_factor) by `factor`,
    and blends the two in between, linearly in original_context / wavelength.

    The float32 table of Meta's `precompute_freqs_cis`/`apply_scaling` and Hugging Face's
    `_compute_llama3_parameters`, bit for bit, on every CPU: each power θ^(2i/Dh) is the correctly
    rounded float32 value, and every later step is an exactly rounded float32 operation (division,
    multiplication, subtraction, addition) in the references' order. The power is computed in
    float64 by the C library's scalar `pow` and rounded to float32 once, which is correct unless it
    lies within a float64 rounding error of a float32 rounding boundary (the tests check that it
    does not, for the released shapes); NumPy's float32 `**` is not correctly rounded, and its
    AVX-512 kernel misses Meta's 8B table by 1-2 ulp in 13 of 64 entries.

    Source: RoFormer θ_i (arXiv 2104.09864); llama-models precompute_freqs_cis and apply_scaling.
    """
    Dh = config.head_dim
    theta = float(np.float32(config.rope_theta))
    exponents = np.arange(0, Dh, 2, dtype=np.float32) / np.float32(Dh)  # float32, as the references
    powers = np.array([math.pow(theta, float(e)) for e in exponents], dtype=np.float32)
    freqs = np.float32(1) / powers
    s = config.rope_scaling
    if s is not None:
        wavelen = np.float32(2 * math.pi) / freqs
        low_freq_wavelen = s.original_context / s.low_freq_factor
        high_freq_wavelen = s.original_context / s.high_freq_factor
        smooth = (np.float32(s.original_context) / wavelen - np.float32(s.low_freq_factor)) / np.float32(
            s.high_freq_factor - s.low_freq_factor)
        blended = (1 - smooth) * freqs / np.float32(s.factor) + smooth * freqs
        freqs = np.where(wavelen > low_freq_wavelen, freqs / np.float32(s.factor),
                         np.where(wavelen < high_freq_wavelen, freqs, blended))
    return expect_shape(freqs.astype(np.float32), (Dh // 2,), "rope frequencies")


def rope_cos_sin(positions: np.ndarray, freqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # [T], [Dh/2] -> [T, Dh/2], [T, Dh/2]
    """cos and sin of the rotation angle position · frequency.

    The angle is rounded to float32 before cos/sin, as Meta's and Hugging Face's references do
    (a float32 outer product of positions and frequencies). At position p the angle's float32
    rounding error is up to p · 2⁻²⁴ radians (about 1e-3 at p = 20,000), far larger than cos/sin's
    own error, so following the references' rounding is what makes high positions agree.

    Source: RoFormer eq. 34's cos(m θ_i), sin(m θ_i) (arXiv 2104.09864); llama-models precompute_freqs_cis.
    """
    angles = positions.astype(np.float32)[:, None] * freqs[None, :]
    return np.cos(angles), np.sin(angles)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    # [T, n, Dh], [T, Dh/2], [T, Dh/2] -> [T, n, Dh]
    """Rotate each pair (x[2i], x[2i+1]) of every head by the angle of its position and pair i.

    As in Meta's reference, the pair is the complex number a + ib and the rotation is a product
    with e^(iθ) = cos θ + i sin θ: (a + ib) · e^(iθ) = (a·cos - b·sin) + i(a·sin + b·cos).
    A float32 [..., Dh] array viewed as complex64 is exactly these Dh/2 pairs.

    Source: RoFormer eq. 34 (arXiv 2104.09864); llama-models apply_rotary_emb.
    """
    T, n, Dh = x.shape
    expect_shape(cos, (T, Dh // 2), "rope cos")
    pairs = np.ascontiguousarray(x, dtype=np.float32).view(np.complex64)  # [T, n, Dh/2]
    rotation = (cos + 1j * sin)[:, None, :]  # [T, 1, Dh/2] complex64
    return (pairs * rotation).view(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:  # [..., S] -> [..., S]
    """exp(x - max) / sum exp(x - max) along the last axis; masked (-inf) entries become 0.

    Source: the softmax of scaled dot-product attention (arXiv 1706.03762 eq. 1), taken in float32
    as llama-models' Attention.forward takes it.
    """
    e = x - x.max(axis=-1, keepdims=True)
    np.exp(e, out=e)  # in place: attention's scores are the largest arrays of a prefill
    e /= e.sum(axis=-1, keepdims=True)
    return e


def causal_mask(T: int, S: int) -> np.ndarray:  # -> [T, S]
    """0 where query t (the last T of S positions) may see key s, -inf where s is in its future.

    Source: llama-models Transformer.forward's mask (with the cached positions in front).
    """
    future = np.arange(S)[None, :] > (S - T + np.arange(T))[:, None]
    return np.where(future, np.float32(-np.inf), np.float32(0))


def causal_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray,
                     keep: Keep = keep_nothing) -> np.ndarray:
    # [T, H, Dh], [KV, S, Dh], [KV, S, Dh] -> [T, H, Dh]
    """softmax(q · kᵀ / √Dh + causal mask) · v, with grouped-query attention.

    The T queries are the last T of the S positions, so query t sees keys 0 .. S-T+t.
    Query head h reads key/value head h // (H / KV): splitting H into (KV, H/KV) groups the
    query heads that share one key/value head, without copying keys and values H/KV times.

    Source: scaled dot-product attention (arXiv 1706.03762 eq. 1) with GQA (arXiv 2305.13245).
    """
    T, H, Dh = q.shape
    KV, S, _ = keys.shape
    expect_shape(values, (KV, S, Dh), "attention values")
    n_rep = H // KV
    q_groups = q.reshape(T, KV, n_rep, Dh).transpose(1, 2, 0, 3)  # [KV, H/KV, T, Dh]
    scores = q_groups @ keys[:, None].swapaxes(-1, -2)  # [KV, H/KV, T, S]
    scores /= np.float32(math.sqrt(Dh))
    scores += causal_mask(T, S)
    probs = softmax(scores)  # [KV, H/KV, T, S]
    keep("probs", probs.reshape(H, T, S))
    out = probs @ values[:, None]  # [KV, H/KV, T, Dh]
    return out.transpose(2, 0, 1, 3).reshape(T, H, Dh)


class KVCache:
    """Keys (after rope) and values of every token seen so far, for every layer.

    Preallocated for `max_len` tokens. Slots 0 .. length-1 hold the tokens fed so far; `forward`
    writes each layer's keys and values into the next free slots (`store`) and advances `length`
    once every layer holds them. A token's rope position is independent of its slot (`forward`'s
    `pos`), so a cache may start at any position.

    Source: llama-models Attention.cache_k / cache_v.
    """

    def __init__(self, config: ModelConfig, max_len: int):
        shape = (config.n_layers, config.n_kv_heads, max_len, config.head_dim)  # [L, KV, max_len, Dh]
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        self.max_len = max_len
        self.length = 0  # slots holding tokens, in every layer

    def store(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # [T, KV, Dh], [T, KV, Dh] -> [KV, S, Dh], [KV, S, Dh] with S = start + T
        """Write one layer's keys and values of T tokens into slots start .. start+T-1; return
        the layer's slots 0 .. start+T-1. `length` is left alone (see `forward`)."""
        end = start + k.shape[0]
        self.k[layer, :, start:end] = k.transpose(1, 0, 2)
        self.v[layer, :, start:end] = v.transpose(1, 0, 2)
        return self.k[layer, :, :end], self.v[layer, :, :end]


def attention(x: np.ndarray, wq: np.ndarray, wk: np.ndarray, wv: np.ndarray, wo: np.ndarray,
              cos: np.ndarray, sin: np.ndarray, cache: KVCache, layer: int, start: int,
              config: ModelConfig, keep: Keep = keep_nothing) -> np.ndarray:  # [T, D] -> [T, D]
    """Project to query/key/value heads, rotate q and k by position, attend causally over the
    cache's first `start` slots plus these tokens (stored from slot `start` on), project back:
    wo · attention(rope(wq x), rope(wk x), wv x).

    Source: llama-models Attention.forward.
    """
    T = x.shape[0]
    H, KV, Dh = config.n_heads, config.n_kv_heads, config.head_dim
    q = keep("q", linear(x, wq).reshape(T, H, Dh))  # [T, D] -> [T, H, Dh]
    k = keep("k", linear(x, wk).reshape(T, KV, Dh))  # [T, D] -> [T, KV, Dh]
    v = keep("v", linear(x, wv).reshape(T, KV, Dh))  # [T, D] -> [T, KV, Dh]
    q_rope = keep("q_rope", rope(q, cos, sin))
    k_rope = keep("k_rope", rope(k, cos, sin))
    keys, values = cache.store(layer, start, k_rope, v)  # [KV, S, Dh] each
    attn = keep("attn", causal_attention(q_rope, keys, values, keep).reshape(T, H * Dh))  # [T, H*Dh]
    return keep("attn_out", linear(attn, wo))  # [T, H*Dh] -> [T, D]


def silu(x: np.ndarray) -> np.ndarray:  # [...] -> [...]
    """x · sigmoid(x). For x < -88, exp(-x) overflows to inf and the result is the correct -0.

    Source: SiLU, the Swish of SwiGLU (arXiv 2002.05202).
    """
    with np.errstate(over="ignore"):
        return x / (1 + np.exp(-x))


def swiglu(x: np.ndarray, w1: np.ndarray, w2: np.ndarray, w3: np.ndarray,
           keep: Keep = keep_nothing) -> np.ndarray:  # [T, D], [F, D], [D, F], [F, D] -> [T, D]
    """w2 · (silu(w1 · x) ⊙ (w3 · x)): a gated feed-forward; w1 is the gate, w3 the up projection.

    Source: FFN_SwiGLU of GLU variants (arXiv 2002.05202); llama-models FeedForward.
    """
    hidden = keep("ffn_hidden", silu(linear(x, w1)) * linear(x, w3))  # [T, F]
    return keep("ffn_out", linear(hidden, w2))  # [T, F] -> [T, D]


def transformer_block(x: np.ndarray, weights: Mapping[str, np.ndarray], layer: int,
                      config: ModelConfig, cos: np.ndarray, sin: np.ndarray, cache: KVCache,
                      start: int, keep: Keep = keep_nothing) -> np.ndarray:  # [T, D] -> [T, D]
    """h = x + attention(rmsnorm(x)); out = h + swiglu(rmsnorm(h)).

    Source: the Llama 3 paper's pre-norm block (arXiv 2407.21783); llama-models TransformerBlock.
    """
    def w(name):  # this layer's weight
        return weights[f"layers.{layer}.{name}.weight"]

    eps = config.norm_eps
    wq, wk, wv, wo = (w(f"attention.{n}") for n in ("wq", "wk", "wv", "wo"))
    w1, w2, w3 = (w(f"feed_forward.{n}") for n in ("w1", "w2", "w3"))
    h = keep("h", x + attention(keep("attn_norm", rmsnorm(x, w("attention_norm"), eps)),
                                wq, wk, wv, wo, cos, sin, cache, layer, start, config, keep))
    return keep("out", h + swiglu(keep("ffn_norm", rmsnorm(h, w("ffn_norm"), eps)), w1, w2, w3, keep))


def forward(weights: Mapping[str, np.ndarray], config: ModelConfig, tokens,
            cache: Optional[KVCache] = None, pos: Optional[int] = None,
            trace: Optional[Trace] = None, last_only: bool = False) -> np.ndarray:  # [T] -> [T, V]
    """Logits for each of `tokens`, the first at rope position `pos`.

    tokens: token ids (a list or int array, [T]); weights: canonical names, float32 or bfloat16;
    returns float32 logits [T, V] (with `last_only`, only the last token's, [1, V]: all that
    generation needs after a prefill). The tokens attend to what `cache` holds (from earlier
    calls) and to each other, causally, and are added to it; without a cache they attend only to
    each other. `pos` defaults to the number of tokens the cache holds (0 without a cache): the
    tokens continue what was fed before. `trace` records the named stages (`llama3_np.stages`).
    Raises Llama3Error for token ids outside the vocabulary, a full cache or a negative position.

    Source: llama-models Transformer.forward.
    """
    if cache is None:
        cache = KVCache(config, np.size(tokens))
    start = cache.length  # these tokens go into cache slots start .. start+T-1
    pos = start if pos is None else pos
    tokens = forward_arguments(tokens, config.vocab_size, start, cache.max_len, pos)  # [T]
    T = tokens.shape[0]
    cos, sin = rope_cos_sin(pos + np.arange(T), rope_frequencies(config))  # [T, Dh/2] each
    keep = scoped(trace, "")
    x = keep("embed", expect_shape(embed(tokens, weights["tok_embeddings.weight"]), (T, config.dim), "embed"))
    for layer in range(config.n_layers):
        x = transformer_block(x, weights, layer, config, cos, sin, cache, start,
                              scoped(trace, f"layers.{layer}."))
    cache.length = start + T  # every layer now holds these tokens: the cache advances once, here
    if last_only:
        x = x[-1:]
    x = keep("norm", rmsnorm(x, weights["norm.weight"], config.norm_eps))
    logits = keep("logits", linear(x, weights["output.weight"]))  # [T, D] -> [T, V]
    return expect_shape(logits, (x.shape[0], config.vocab_size), "logits")
