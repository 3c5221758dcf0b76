"""Llama 3 inference as plain NumPy functions: the specification that runs.

Read top to bottom: embed -> (rmsnorm -> attention with rope -> residual -> rmsnorm -> swiglu ->
residual) x n_layers -> rmsnorm -> output projection. Every number comes from `ModelConfig`; this
module does no I/O and knows nothing of file formats.

Dimensions, used in every shape comment:
    T   tokens in this call            D   model dim (config.dim)
    S   tokens attended to (cached + T) F   feed-forward dim (config.ffn_dim)
    H   query heads (config.n_heads)    KV  key/value heads (config.n_kv_heads)
    Dh  head dim (config.head_dim)      V   vocabulary size (config.vocab_size)

Weights use Meta's names (`layers.0.attention.wq.weight`, ...) and Meta's rope layout: dims 2i and
2i+1 of every head rotate together. They may be float32 or bfloat16 (ml_dtypes); compute is always
float32, and bfloat16 weights are converted where they are used, a block of rows at a time (`linear`).
"""

from __future__ import annotations

import fnmatch
import math
from typing import Callable, Mapping, Optional

import numpy as np

from . import products
from .config import ModelConfig
from .errors import Llama3Error


# ---------------------------------------------------------------------------------------------
# Shapes and traces


def expect_shape(x: np.ndarray, shape: tuple, name: str) -> np.ndarray:
    """Runtime check that keeps the shape comments honest; raises on any mismatch."""
    if x.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {x.shape}")
    return x


class Trace(dict):
    """The named stages of one forward call (DESIGN.md), in model order, as float32 copies.

    `patterns` are shell-style globs over stage names (`layers.3.*`, `logits`); attention
    probabilities (`layers.i.probs`, [H, T, S]) are large and kept only when a pattern names them.
    """

    def __init__(self, patterns=("*",)):
        super().__init__()
        self.patterns = tuple(patterns)

    def wants(self, name: str) -> bool:
        if name.endswith(".probs"):
            return any(p != "*" and fnmatch.fnmatchcase(name, p) for p in self.patterns)
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def keep(self, name: str, x: np.ndarray) -> None:
        if self.wants(name):
            self[name] = np.array(x, dtype=np.float32)  # a copy: buffers may be reused later


Keep = Callable[[str, np.ndarray], None]


def _discard(name: str, x: np.ndarray) -> None:
    pass


def _scoped(trace: Optional[Trace], prefix: str) -> Keep:
    """A `keep(name, x)` that records `prefix + name` into `trace`, or does nothing."""
    if trace is None:
        return _discard
    return lambda name, x: trace.keep(prefix + name, x)


def as_float32(w: np.ndarray) -> np.ndarray:
    """A weight as float32: the array itself when it already is, else a converted copy."""
    return np.asarray(w, dtype=np.float32)


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:  # [T, n_in], [n_out, n_in] -> [T, n_out]
    """x · wᵀ: the product with a weight stored as [n_out, n_in] (the layout of Meta's checkpoints).

    Computed by `products.linear` on llama3_np's threads, a bfloat16 weight converted to float32 a
    block of rows at a time: float32 `x @ w.T` up to the order of each dot product's sum.
    """
    return products.linear(x, w)


# ---------------------------------------------------------------------------------------------
# The stages


def embed(tokens: np.ndarray, tok_embeddings: np.ndarray) -> np.ndarray:  # [T], [V, D] -> [T, D]
    """Row lookup: token id t becomes row t of the embedding matrix."""
    V = tok_embeddings.shape[0]
    if tokens.size and (tokens.min() < 0 or tokens.max() >= V):
        bad = int(tokens[(tokens < 0) | (tokens >= V)][0])
        raise Llama3Error(f"token id {bad} is outside the vocabulary (0..{V - 1})")
    return as_float32(tok_embeddings[tokens])


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:  # [T, D], [D] -> [T, D]
    """x / sqrt(mean(x²) + eps) · weight, per row (no mean subtraction, no bias)."""
    expect_shape(weight, x.shape[-1:], "rmsnorm weight")
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * weight


def rope_frequencies(config: ModelConfig) -> np.ndarray:  # -> [Dh/2]
    """The rotation frequency of each dim pair: θ^(-2i/Dh), i = 0 .. Dh/2-1, then "llama3" scaling.

    Llama 3.1+ scaling (config.rope_scaling) leaves short wavelengths (< original_context /
    high_freq_factor) alone, divides long ones (> original_context / low_freq_factor) by `factor`,
    and blends the two in between, linearly in original_context / wavelength.

    Computed in float32 operation by operation, as both references compute it.
    """
    Dh = config.head_dim
    freqs = 1.0 / (np.float32(config.rope_theta) ** (np.arange(0, Dh, 2, dtype=np.float32) / np.float32(Dh)))
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
    """
    angles = positions.astype(np.float32)[:, None] * freqs[None, :]
    return np.cos(angles), np.sin(angles)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    # [T, n, Dh], [T, Dh/2], [T, Dh/2] -> [T, n, Dh]
    """Rotate each pair (x[2i], x[2i+1]) of every head by the angle of its position and pair i.

    As in Meta's reference, the pair is the complex number a + ib and the rotation is a product
    with e^(iθ) = cos θ + i sin θ: (a + ib) · e^(iθ) = (a·cos - b·sin) + i(a·sin + b·cos).
    A float32 [..., Dh] array viewed as complex64 is exactly these Dh/2 pairs.
    """
    T, n, Dh = x.shape
    expect_shape(cos, (T, Dh // 2), "rope cos")
    pairs = np.ascontiguousarray(x, dtype=np.float32).view(np.complex64)  # [T, n, Dh/2]
    rotation = (cos + 1j * sin)[:, None, :]  # [T, 1, Dh/2] complex64
    return (pairs * rotation).view(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:  # [..., S] -> [..., S]
    """exp(x - max) / sum exp(x - max) along the last axis; masked (-inf) entries become 0."""
    e = x - x.max(axis=-1, keepdims=True)
    np.exp(e, out=e)  # in place: attention's scores are the largest arrays of a prefill
    e /= e.sum(axis=-1, keepdims=True)
    return e


def causal_mask(T: int, S: int) -> np.ndarray:  # -> [T, S]
    """0 where query t (the last T of S positions) may see key s, -inf where s is in its future."""
    future = np.arange(S)[None, :] > (S - T + np.arange(T))[:, None]
    return np.where(future, np.float32(-np.inf), np.float32(0))


def causal_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray,
                     keep: Keep = _discard) -> np.ndarray:
    # [T, H, Dh], [KV, S, Dh], [KV, S, Dh] -> [T, H, Dh]
    """softmax(q · kᵀ / √Dh + causal mask) · v, with grouped-query attention.

    The T queries are the last T of the S positions, so query t sees keys 0 .. S-T+t.
    Query head h reads key/value head h // (H / KV): splitting H into (KV, H/KV) groups the
    query heads that share one key/value head, without copying keys and values H/KV times.
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

    Preallocated for `max_len` tokens. Slots are filled in order; a token's rope position is
    independent of its slot (`forward`'s `pos`), so a cache may start at any position.
    """

    def __init__(self, config: ModelConfig, max_len: int):
        shape = (config.n_layers, config.n_kv_heads, max_len, config.head_dim)  # [L, KV, max_len, Dh]
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        self.max_len = max_len
        self.length = 0  # slots filled by earlier forward calls

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # [T, KV, Dh], [T, KV, Dh] -> [KV, S, Dh], [KV, S, Dh] with S = length + T
        """Store this call's keys and values after the cached ones; return all of them."""
        start, end = self.length, self.length + k.shape[0]
        self.k[layer, :, start:end] = k.transpose(1, 0, 2)
        self.v[layer, :, start:end] = v.transpose(1, 0, 2)
        return self.k[layer, :, :end], self.v[layer, :, :end]


def attention(x: np.ndarray, wq: np.ndarray, wk: np.ndarray, wv: np.ndarray, wo: np.ndarray,
              cos: np.ndarray, sin: np.ndarray, cache: KVCache, layer: int, config: ModelConfig,
              keep: Keep = _discard) -> np.ndarray:  # [T, D] -> [T, D]
    """Project to query/key/value heads, rotate q and k by position, attend causally over the
    cache plus these tokens, project back: wo · attention(rope(wq x), rope(wk x), wv x)."""
    T = x.shape[0]
    H, KV, Dh = config.n_heads, config.n_kv_heads, config.head_dim
    q = linear(x, wq).reshape(T, H, Dh)
    k = linear(x, wk).reshape(T, KV, Dh)
    v = linear(x, wv).reshape(T, KV, Dh)
    q_rope, k_rope = rope(q, cos, sin), rope(k, cos, sin)
    for name, value in (("q", q), ("k", k), ("v", v), ("q_rope", q_rope), ("k_rope", k_rope)):
        keep(name, value)
    keys, values = cache.append(layer, k_rope, v)  # [KV, S, Dh] each
    attn = causal_attention(q_rope, keys, values, keep).reshape(T, H * Dh)
    keep("attn", attn)
    return linear(attn, wo)


def silu(x: np.ndarray) -> np.ndarray:  # [...] -> [...]
    """x · sigmoid(x). For x < -88, exp(-x) overflows to inf and the result is the correct -0."""
    with np.errstate(over="ignore"):
        return x / (1 + np.exp(-x))


def swiglu(x: np.ndarray, w1: np.ndarray, w2: np.ndarray, w3: np.ndarray,
           keep: Keep = _discard) -> np.ndarray:  # [T, D], [F, D], [D, F], [F, D] -> [T, D]
    """w2 · (silu(w1 · x) ⊙ (w3 · x)): a gated feed-forward; w1 is the gate, w3 the up projection."""
    hidden = silu(linear(x, w1)) * linear(x, w3)  # [T, F]
    keep("ffn_hidden", hidden)
    return linear(hidden, w2)


def transformer_block(x: np.ndarray, weights: Mapping[str, np.ndarray], layer: int,
                      config: ModelConfig, cos: np.ndarray, sin: np.ndarray, cache: KVCache,
                      keep: Keep = _discard) -> np.ndarray:  # [T, D] -> [T, D]
    """h = x + attention(rmsnorm(x)); out = h + swiglu(rmsnorm(h))."""
    def w(name):  # this layer's weight
        return weights[f"layers.{layer}.{name}.weight"]

    attn_norm = rmsnorm(x, as_float32(w("attention_norm")), config.norm_eps)
    keep("attn_norm", attn_norm)
    attn_out = attention(attn_norm, w("attention.wq"), w("attention.wk"), w("attention.wv"),
                         w("attention.wo"), cos, sin, cache, layer, config, keep)
    keep("attn_out", attn_out)
    h = x + attn_out
    keep("h", h)
    ffn_norm = rmsnorm(h, as_float32(w("ffn_norm")), config.norm_eps)
    keep("ffn_norm", ffn_norm)
    ffn_out = swiglu(ffn_norm, w("feed_forward.w1"), w("feed_forward.w2"), w("feed_forward.w3"), keep)
    keep("ffn_out", ffn_out)
    out = h + ffn_out
    keep("out", out)
    return out


def forward(weights: Mapping[str, np.ndarray], config: ModelConfig, tokens,
            cache: Optional[KVCache] = None, pos: int = 0,
            trace: Optional[Trace] = None, last_only: bool = False) -> np.ndarray:  # [T] -> [T, V]
    """Logits for each of `tokens`, the first at rope position `pos`.

    The tokens attend to what `cache` holds (from earlier calls) and to each other, causally, and
    are appended to it. Without a cache they attend only to each other. With `last_only`, only the
    last token's logits are computed ([1, V]): all that generation needs after a prefill.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.ndim != 1 or tokens.size == 0:
        raise Llama3Error(f"forward needs a non-empty 1-D list of token ids, got shape {tokens.shape}")
    T = tokens.shape[0]
    if cache is None:
        cache = KVCache(config, T)
    if cache.length + T > cache.max_len:
        raise Llama3Error(f"the KV cache holds {cache.length} of {cache.max_len} tokens; "
                          f"{T} more do not fit (use a larger context)")
    if pos < 0:
        raise Llama3Error(f"position must be >= 0, got {pos}")

    positions = pos + np.arange(T)
    cos, sin = rope_cos_sin(positions, rope_frequencies(config))  # [T, Dh/2] each
    x = embed(tokens, weights["tok_embeddings.weight"])  # [T, D]
    expect_shape(x, (T, config.dim), "embed")
    keep = _scoped(trace, "")
    keep("embed", x)
    for layer in range(config.n_layers):
        x = transformer_block(x, weights, layer, config, cos, sin, cache,
                              _scoped(trace, f"layers.{layer}."))
    cache.length += T
    if last_only:
        x = x[-1:]
    x = rmsnorm(x, as_float32(weights["norm.weight"]), config.norm_eps)
    keep("norm", x)
    logits = linear(x, weights["output.weight"])
    keep("logits", logits)
    return expect_shape(logits, (x.shape[0], config.vocab_size), "logits")
