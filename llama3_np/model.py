"""Llama 3 inference as plain NumPy functions: the specification that runs.

Read top to bottom: embed -> (rmsnorm -> attention with rope -> residual -> rmsnorm -> swiglu ->
residual) x n_layers -> rmsnorm -> output projection. Every number comes from `ModelConfig`; this
module does no I/O, knows nothing of file formats, and leaves low-precision and fused products
(`linear`, `linears`) and argument checks (`checks`) to their own modules.

Dimensions, used in every shape comment:
    T   tokens in this call            D   model dim (config.dim)
    S   tokens attended to (cached + T) F   feed-forward dim (config.ffn_dim)
    H   query heads (config.n_heads)    KV  key/value heads (config.n_kv_heads)
    Dh  head dim (config.head_dim)      V   vocabulary size (config.vocab_size)
    B   sequences in a batch (`forward_batch`; 1 in `forward`)

A batch of B sequences runs as the rows of one pass, sequence after sequence (T counts the rows of
all of them), so that every weight product reads each weight once for the whole batch. Every stage
works row by row except attention, where each sequence attends only to its own tokens and its own
KV cache (`LayerCache.rows`): no padding ever enters the model, as in llama.cpp's batches, where
every token carries its sequence and its position. Read with B = 1, it is one sequence's pass.

Weights use Meta's names (`layers.0.attention.wq.weight`, ...; `LayerWeights` declares a layer's)
and Meta's rope layout: dims 2i and 2i+1 of every head rotate together; float32 or bfloat16.

The compute mode (`config.ComputeMode`) says what every stage computes in: float32 by default,
float64, or the bfloat16/float16 arithmetic of an engine, emulated: arrays stay float32, every
product accumulates in float32 as the engines' CPU kernels do, and `rounded(x)` rounds a result to
the mode's dtype exactly where the engine rounds it (the identity in float32 and float64). The cast
points are read from two sources and cited per stage: Hugging Face transformers 5.23.0
`models/llama/modeling_llama.py` (LlamaForCausalLM, eager attention; "HF" below) and Meta's
llama-models 0.3.0 `models/llama3/model.py` ("Meta"). They round at the same places except in rope
and the attention scale, where `mode.casts` picks one.

Each stage names its source: the Llama 3 paper (arXiv 2407.21783), RMSNorm (1910.07467), RoFormer
(2104.09864), GQA (2305.13245), GLU variants (2002.05202), and the function of Meta's
`llama-models` reference (`models/llama3/model.py`) it matches. `keep(name, x)` records a named
stage (`llama3_np.stages`) and returns x.
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass, fields
from typing import Mapping, NamedTuple, Optional, Sequence

import numpy as np

from .checks import batch_arguments, expect_shape, finite_stages, forward_arguments, forward_mode
from .config import ComputeMode, ModelConfig
from .linear import linear, linears
from .stages import Keep, Trace, keep_nothing, legend, scoped, start_point

FLOAT32 = ComputeMode("float32")


# ---------------------------------------------------------------------------------------------
# Weights: Meta's names, as the fields of one value per layer


@dataclass(frozen=True)
class AttentionWeights:
    """`layers.i.attention.*.weight`. Source: llama-models Attention."""

    wq: np.ndarray  # [H*Dh, D]
    wk: np.ndarray  # [KV*Dh, D]
    wv: np.ndarray  # [KV*Dh, D]
    wo: np.ndarray  # [D, H*Dh]


@dataclass(frozen=True)
class FeedForwardWeights:
    """`layers.i.feed_forward.*.weight`. Source: llama-models FeedForward."""

    w1: np.ndarray  # [F, D]  the gate
    w2: np.ndarray  # [D, F]  the down projection
    w3: np.ndarray  # [F, D]  the up projection


@dataclass(frozen=True)
class LayerWeights:
    """One transformer block's weights, `layers.i.<field>...weight` in the canonical mapping.

    Source: llama-models TransformerBlock.
    """

    attention_norm: np.ndarray  # [D]
    attention: AttentionWeights
    ffn_norm: np.ndarray  # [D]
    feed_forward: FeedForwardWeights

    @classmethod
    def of(cls, weights: Mapping[str, np.ndarray], layer: int, config: ModelConfig,
           mode: ComputeMode = FLOAT32) -> "LayerWeights":
        """Layer `layer`'s weights from the canonical mapping, each checked against its shape and
        as `mode` computes with it (`ComputeMode.weight`: rounded to bfloat16/float16 unless stored so).

        Raises KeyError for a missing name, ValueError for a shape the config does not imply."""
        prefix = f"layers.{layer}."
        sizes = legend(config, 0)

        def tensor(name: str) -> np.ndarray:
            w = expect_shape(weights[prefix + name + ".weight"], WEIGHT_SHAPES[name](sizes), prefix + name)
            return mode.weight(w, prefix + name + ".weight")

        def group(kind, name: str):
            return kind(**{f.name: tensor(f"{name}.{f.name}") for f in fields(kind)})

        return cls(attention_norm=tensor("attention_norm"), attention=group(AttentionWeights, "attention"),
                   ffn_norm=tensor("ffn_norm"), feed_forward=group(FeedForwardWeights, "feed_forward"))


# The shape of each of a layer's weights, in the legend's sizes (`stages.legend`).
WEIGHT_SHAPES = {
    "attention_norm": lambda s: (s["D"],),
    "attention.wq": lambda s: (s["H"] * s["Dh"], s["D"]),
    "attention.wk": lambda s: (s["KV"] * s["Dh"], s["D"]),
    "attention.wv": lambda s: (s["KV"] * s["Dh"], s["D"]),
    "attention.wo": lambda s: (s["D"], s["H"] * s["Dh"]),
    "ffn_norm": lambda s: (s["D"],),
    "feed_forward.w1": lambda s: (s["F"], s["D"]),
    "feed_forward.w2": lambda s: (s["D"], s["F"]),
    "feed_forward.w3": lambda s: (s["F"], s["D"]),
}


# Layer weights already checked, by the ids of the arrays a mapping held under the layer's names:
# weak references to those arrays (an entry keeps nothing alive) and whether `ComputeMode.weight`
# holds them as they are (so `LayerWeights.of` of the same arrays is the same value).
_checked_layers: dict[tuple, list[weakref.ref]] = {}


def layer_weights(weights: Mapping[str, np.ndarray], layer: int, config: ModelConfig,
                  mode: ComputeMode = FLOAT32) -> LayerWeights:
    """`LayerWeights.of(weights, layer, config, mode)`, without checking again the arrays it
    checked before (a decode step would otherwise check every weight's shape and dtype again)."""
    stored = [weights[name] for name in _layer_names(layer)]
    key = (config, mode, *map(id, stored))
    refs = _checked_layers.get(key)
    if refs is None or not all(ref() is w for ref, w in zip(refs, stored)):
        w = LayerWeights.of(weights, layer, config, mode)
        held = [w.attention_norm, *vars(w.attention).values(), w.ffn_norm, *vars(w.feed_forward).values()]
        if not all(a is b for a, b in zip(held, stored)):  # converted for the mode: done in every call
            return w
        if len(_checked_layers) >= 1 << 14:  # only weights freed since leave entries behind
            _checked_layers.clear()
        try:
            _checked_layers[key] = [weakref.ref(a) for a in stored]
        except TypeError:  # an array type without weak references: checked in every call
            pass
        return w
    norm1, wq, wk, wv, wo, norm2, w1, w2, w3 = stored
    return LayerWeights(norm1, AttentionWeights(wq, wk, wv, wo), norm2, FeedForwardWeights(w1, w2, w3))


@functools.lru_cache(maxsize=None)
def _layer_names(layer: int) -> tuple[str, ...]:
    """The canonical names of layer `layer`'s weights, in `LayerWeights`' field order."""
    names = ["attention_norm", *(f"attention.{f.name}" for f in fields(AttentionWeights)),
             "ffn_norm", *(f"feed_forward.{f.name}" for f in fields(FeedForwardWeights))]
    return tuple(f"layers.{layer}.{name}.weight" for name in names)


@functools.lru_cache(maxsize=64)
def frequencies(config: ModelConfig, mode: ComputeMode = FLOAT32) -> np.ndarray:  # -> [Dh/2], read-only
    """`rope_frequencies(config, mode)`, computed once per config and mode."""
    freqs = rope_frequencies(config, mode)
    freqs.flags.writeable = False
    return freqs


# ---------------------------------------------------------------------------------------------
# The stages


def embed(tokens: np.ndarray, tok_embeddings: np.ndarray, mode: ComputeMode = FLOAT32) -> np.ndarray:
    # [T], [V, D] -> [T, D]
    """Row lookup: token id t becomes row t of the embedding matrix (in the mode's dtype: the rows
    of the weight as the mode holds it).

    Source: llama-models Transformer.tok_embeddings; HF LlamaModel.embed_tokens.
    """
    return mode.rounded(np.asarray(tok_embeddings[tokens], dtype=mode.work))


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float, mode: ComputeMode = FLOAT32) -> np.ndarray:
    # [T, D], [D] -> [T, D]
    """x / sqrt(mean(x²) + eps) · weight, per row (no mean subtraction, no bias).

    Low precision: normalised in float32, rounded to the dtype, then multiplied by the weight in
    the dtype (HF LlamaRMSNorm.forward: `.to(torch.float32)`, `* torch.rsqrt(variance + eps)`,
    `self.weight * hidden_states.to(input_dtype)`; Meta RMSNorm.forward: `self._norm(x.float())
    .type_as(x) * self.weight`). x / sqrt and x * rsqrt give the same float32 value here (exactly
    rounded square root and division; measured equal after rounding on every element tried).

    Source: RMSNorm (arXiv 1910.07467); llama-models RMSNorm.
    """
    expect_shape(weight, x.shape[-1:], "rmsnorm weight")
    rounded = mode.rounded
    normed = rounded(x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + x.dtype.type(eps)))
    return rounded(normed * np.asarray(weight, dtype=x.dtype))


def rope_frequencies(config: ModelConfig, mode: ComputeMode = FLOAT32) -> np.ndarray:  # -> [Dh/2]
    """The rotation frequency of each dim pair: θ^(-2i/Dh), i = 0 .. Dh/2-1, then "llama3" scaling.

    Llama 3.1+ scaling (config.rope_scaling) leaves short wavelengths (< original_context /
    high_freq_factor) alone, divides long ones (> original_context / low_freq_factor) by `factor`,
    and blends the two in between, linearly in original_context / wavelength.

    In float32, the table of Meta's `precompute_freqs_cis`/`apply_scaling` and Hugging Face's
    `_compute_llama3_parameters`, bit for bit, on every CPU: each power θ^(2i/Dh) is the correctly
    rounded float32 value, and every later step is an exactly rounded float32 operation (division,
    multiplication, subtraction, addition) in the references' order. The power is computed in
    float64 by the C library's scalar `pow` and rounded to float32 once, which is correct unless it
    lies within a float64 rounding error of a float32 rounding boundary (the tests check that it
    does not, for the released shapes); NumPy's float32 `**` is not correctly rounded, and its
    AVX-512 kernel misses Meta's 8B table by 1-2 ulp in 13 of 64 entries. In float64 mode every
    step is float64.

    Source: RoFormer θ_i (arXiv 2104.09864); llama-models precompute_freqs_cis and apply_scaling.
    """
    Dh = config.head_dim
    f = mode.work.type  # float32, as the references; float64 in float64 mode
    theta = float(f(config.rope_theta))
    exponents = np.arange(0, Dh, 2, dtype=f) / f(Dh)
    powers = np.array([math.pow(theta, float(e)) for e in exponents], dtype=f)
    freqs = f(1) / powers
    s = config.rope_scaling
    if s is not None:
        wavelen = f(2 * math.pi) / freqs
        low_freq_wavelen = s.original_context / s.low_freq_factor
        high_freq_wavelen = s.original_context / s.high_freq_factor
        smooth = (f(s.original_context) / wavelen - f(s.low_freq_factor)) / f(
            s.high_freq_factor - s.low_freq_factor)
        blended = (1 - smooth) * freqs / f(s.factor) + smooth * freqs
        freqs = np.where(wavelen > low_freq_wavelen, freqs / f(s.factor),
                         np.where(wavelen < high_freq_wavelen, freqs, blended))
    return expect_shape(freqs.astype(f), (Dh // 2,), "rope frequencies")


class Rotation(NamedTuple):
    """cos and sin of every token's rotation angles, [T, Dh/2] each (`rope_cos_sin`)."""

    cos: np.ndarray
    sin: np.ndarray


def rope_cos_sin(positions: np.ndarray, freqs: np.ndarray) -> Rotation:
    # [T], [Dh/2] -> [T, Dh/2], [T, Dh/2]
    """cos and sin of the rotation angle position · frequency, in the frequencies' dtype.

    The angle is rounded to float32 before cos/sin, as Meta's and Hugging Face's references do
    (a float32 outer product of positions and frequencies). At position p the angle's float32
    rounding error is up to p · 2⁻²⁴ radians (about 1e-3 at p = 20,000), far larger than cos/sin's
    own error, so following the references' rounding is what makes high positions agree.

    Source: RoFormer eq. 34's cos(m θ_i), sin(m θ_i) (arXiv 2104.09864); llama-models precompute_freqs_cis.
    """
    angles = positions.astype(freqs.dtype)[:, None] * freqs[None, :]
    return Rotation(np.cos(angles), np.sin(angles))


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, mode: ComputeMode = FLOAT32) -> np.ndarray:
    # [T, n, Dh], [T, Dh/2], [T, Dh/2] -> [T, n, Dh]
    """Rotate each pair (x[2i], x[2i+1]) of every head by the angle of its position and pair i.

    As in Meta's reference, the pair is the complex number a + ib and the rotation is a product
    with e^(iθ) = cos θ + i sin θ: (a + ib) · e^(iθ) = (a·cos - b·sin) + i(a·sin + b·cos).
    A float32 [..., Dh] array viewed as complex64 (float64 as complex128) is exactly these Dh/2 pairs.
    Meta computes it so in every dtype (apply_rotary_emb: `view_as_complex(xq.float() ...)`,
    `xq_ * freqs_cis` in complex64 with float32 cos/sin, `.type_as(xq)`: one rounding, the caller's).

    transformers' convention in bfloat16/float16 (`mode.casts`) rounds four times more: cos and sin
    to the dtype (LlamaRotaryEmbedding.forward: `cos.to(dtype=x.dtype)`), then each product and the
    sum in the dtype (apply_rotary_pos_emb: `(q * cos) + (rotate_half(q) * sin)`; its rotate-half
    pairs are Meta's pairs in another row order, and rotate_half's negation is exact).

    Source: RoFormer eq. 34 (arXiv 2104.09864); llama-models apply_rotary_emb; HF apply_rotary_pos_emb.
    """
    T, n, Dh = x.shape
    expect_shape(cos, (T, Dh // 2), "rope cos")
    if mode.casts == "transformers":
        rounded = mode.rounded
        cos, sin = rounded(cos)[:, None, :], rounded(sin)[:, None, :]  # [T, 1, Dh/2]
        a, b = x[..., 0::2], x[..., 1::2]  # [T, n, Dh/2] each: the pairs
        out = np.empty_like(x)
        out[..., 0::2] = rounded(rounded(a * cos) - rounded(b * sin))
        out[..., 1::2] = rounded(rounded(b * cos) + rounded(a * sin))
        return out
    work = np.result_type(x.dtype, cos.dtype)
    pairs = np.ascontiguousarray(x, dtype=work).view(np.result_type(work, np.complex64))  # [T, n, Dh/2]
    rotation = (cos + 1j * sin)[:, None, :]  # [T, 1, Dh/2]
    return (pairs * rotation).view(work)


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
                     keep: Keep = keep_nothing, mode: ComputeMode = FLOAT32) -> np.ndarray:
    # [T, H, Dh], [KV, S, Dh], [KV, S, Dh] -> [T, H, Dh]
    """softmax(q · kᵀ / √Dh + causal mask) · v, with grouped-query attention.

    The T queries are the last T of the S positions, so query t sees keys 0 .. S-T+t.
    Query head h reads key/value head h // (H / KV): splitting H into (KV, H/KV) groups the
    query heads that share one key/value head, without copying keys and values H/KV times.

    Low precision: q · kᵀ accumulated in float32 and rounded, scaled and rounded, softmax in
    float32 and rounded, probs · v accumulated in float32 and rounded (HF eager_attention_forward:
    `matmul(query, key_states.transpose(2, 3)) * scaling`, `softmax(..., dtype=torch.float32)
    .to(query.dtype)`, `matmul(attn_weights, value_states)`; Meta Attention.forward: `matmul(xq,
    keys.transpose(2, 3)) / math.sqrt(self.head_dim)`, `softmax(scores.float()).type_as(xq)`,
    `matmul(scores, values)`). The scale is where they differ: transformers multiplies by
    Dh^-0.5 (as float32), Meta divides by √Dh; float32 and float64 divide, as Meta does. Masks:
    transformers adds the dtype's most negative value where Meta adds -inf; both give 0 after the
    softmax. llama.cpp (llamacpp mode) computes in float32 but reads a float16 cache, and a product
    with it first rounds the other operand, q and then the probabilities, to float16
    (`mode.kv_operand`; llm_graph_context::build_attn_mha without flash attention).

    Source: scaled dot-product attention (arXiv 1706.03762 eq. 1) with GQA (arXiv 2305.13245);
    llama-models Attention.forward.
    """
    T, H, Dh = q.shape
    KV, S, _ = keys.shape
    expect_shape(values, (KV, S, Dh), "attention values")
    rounded, f = mode.rounded, mode.work.type
    n_rep = H // KV
    q_groups = q.reshape(T, KV, n_rep, Dh).transpose(1, 2, 0, 3)  # [KV, H/KV, T, Dh]
    scores = rounded(mode.kv_operand(q_groups) @ keys[:, None].swapaxes(-1, -2))  # [KV, H/KV, T, S]
    if mode.casts == "transformers":
        scores *= f(Dh ** -0.5)
    else:
        scores /= f(math.sqrt(Dh))
    scores = rounded(scores)
    scores += causal_mask(T, S)
    probs = keep("probs", rounded(softmax(scores)).reshape(H, T, S)).reshape(KV, n_rep, T, S)
    out = rounded(mode.kv_operand(probs) @ values[:, None])  # [KV, H/KV, T, Dh]
    return out.transpose(2, 0, 1, 3).reshape(T, H, Dh)


class LayerCache(NamedTuple):
    """One layer's slice of one sequence's KV cache during one `forward` call: its key and value
    slots ([KV, max_len, Dh] each, in the mode's storage dtype), `start`, the first slot this call's
    tokens go into, `work`, the dtype the model computes with them in, and `rows`, which rows of
    the call are this sequence's tokens (all of them for one sequence; its own in a batch)."""

    k: np.ndarray
    v: np.ndarray
    start: int
    work: np.dtype
    rows: slice = slice(None)

    def store(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # [T, KV, Dh], [T, KV, Dh] -> [KV, S, Dh], [KV, S, Dh] with S = start + T
        """Write the keys and values of T tokens into slots start .. start+T-1 (exactly: they are
        already rounded to the storage dtype); return slots 0 .. start+T-1 (the earlier tokens',
        then these) in the working dtype."""
        end = self.start + k.shape[0]
        self.k[:, self.start:end] = k.transpose(1, 0, 2)
        self.v[:, self.start:end] = v.transpose(1, 0, 2)
        return np.asarray(self.k[:, :end], dtype=self.work), np.asarray(self.v[:, :end], dtype=self.work)


class KVCache:
    """Keys (after rope) and values of every token seen so far, for every layer, in the compute
    mode's dtype.

    Preallocated for `max_len` tokens. Slots 0 .. length-1 hold the tokens fed so far; `forward`
    hands each layer its slice (`layer`), which writes the layer's keys and values into the next
    free slots, and advances `length` once every layer holds them. A token's rope position is
    independent of its slot (`forward`'s `pos`), so a cache may start at any position.

    `compute` is the mode of every `forward` call that uses the cache (a name or a
    `config.ComputeMode`; `convention` with a name). Keys and values are held in its dtype
    (bfloat16, float16: half float32's memory), as the engines hold them.

    Source: llama-models Attention.cache_k / cache_v (`self.cache_k.to(xq)`: the activations'
    dtype); HF DynamicCache (the dtype of the keys it is given).
    """

    def __init__(self, config: ModelConfig, max_len: int, compute: str | ComputeMode = "float32",
                 convention: str = "transformers"):
        self.mode = ComputeMode.of(compute, convention)
        shape = (config.n_layers, config.n_kv_heads, max_len, config.head_dim)  # [L, KV, max_len, Dh]
        self.k = np.zeros(shape, dtype=self.mode.storage)
        self.v = np.zeros(shape, dtype=self.mode.storage)
        self.max_len = max_len
        self.length = 0  # slots holding tokens, in every layer

    def layer(self, i: int, rows: slice = slice(None)) -> LayerCache:
        """Layer i's slots, with the next token going into slot `length`, for the call's `rows`."""
        return LayerCache(self.k[i], self.v[i], self.length, self.mode.work, rows)


def attention(x: np.ndarray, w: AttentionWeights, rotation: Rotation, caches: Sequence[LayerCache],
              config: ModelConfig, mode: ComputeMode = FLOAT32,
              keep: Keep = keep_nothing) -> np.ndarray:  # [T, D] -> [T, D]
    """Project to query/key/value heads, rotate q and k by position, attend causally over the
    cache's earlier slots plus these tokens (stored into it), project back:
    wo · attention(rope(wq x), rope(wk x), wv x). `caches`: one per sequence (one, for all rows,
    outside a batch); each sequence's rows attend to its own cache alone.

    Low precision: every projection accumulates in float32 and is rounded (torch's CPU bfloat16
    and float16 products; HF LlamaAttention.forward's q_proj/k_proj/v_proj/o_proj, Meta's
    wq/wk/wv/wo); keys and values enter the cache in the dtype.

    Source: llama-models Attention.forward.
    """
    T = x.shape[0]
    H, KV, Dh = config.n_heads, config.n_kv_heads, config.head_dim
    rounded = mode.rounded
    q, k, v = linears(x, w.wq, w.wk, w.wv)  # [T, D] -> [T, H*Dh], [T, KV*Dh], [T, KV*Dh]
    q = keep("q", rounded(q).reshape(T, H, Dh))  # [T, H*Dh] -> [T, H, Dh]
    k = keep("k", rounded(k).reshape(T, KV, Dh))  # [T, KV*Dh] -> [T, KV, Dh]
    v = keep("v", rounded(v).reshape(T, KV, Dh))  # [T, KV*Dh] -> [T, KV, Dh]
    q_rope = keep("q_rope", rounded(rope(q, rotation.cos, rotation.sin, mode)))
    k_rope = keep("k_rope", rounded(rope(k, rotation.cos, rotation.sin, mode)))
    attended = []
    for c in caches:  # each sequence: its rows' queries, its cache's keys and values
        keys, values = c.store(k_rope[c.rows], v[c.rows])  # [KV, S, Dh] each
        attended.append(causal_attention(q_rope[c.rows], keys, values, keep, mode))  # [T, H, Dh]
    heads = attended[0] if len(attended) == 1 else np.concatenate(attended)  # one sequence: no copy
    attn = keep("attn", heads.reshape(T, H * Dh))  # [T, H*Dh]
    return keep("attn_out", rounded(linear(attn, w.wo)))  # [T, H*Dh] -> [T, D]


def silu(x: np.ndarray) -> np.ndarray:  # [...] -> [...]
    """x · sigmoid(x). For x < -88, exp(-x) overflows to inf and the result is the correct -0.

    Source: SiLU, the Swish of SwiGLU (arXiv 2002.05202).
    """
    with np.errstate(over="ignore"):
        return x / (1 + np.exp(-x))


def swiglu(x: np.ndarray, w: FeedForwardWeights, mode: ComputeMode = FLOAT32,
           keep: Keep = keep_nothing) -> np.ndarray:  # [T, D] -> [T, D]
    """w2 · (silu(w1 · x) ⊙ (w3 · x)): a gated feed-forward; w1 is the gate, w3 the up projection.

    Low precision: each projection rounded, silu computed in float32 and rounded (torch's
    elementwise kernels), the gate product rounded (HF LlamaMLP.forward: `down_proj(act_fn(
    gate_proj(x)) * up_proj(x))`; Meta FeedForward.forward: `w2(F.silu(w1(x)) * w3(x))`).

    Source: FFN_SwiGLU of GLU variants (arXiv 2002.05202); llama-models FeedForward.
    """
    rounded = mode.rounded
    gate, up = linears(x, w.w1, w.w3)  # [T, D] -> [T, F], [T, F]
    gate = rounded(silu(rounded(gate)))  # [T, F]
    up = rounded(up)  # [T, F]
    hidden = keep("ffn_hidden", rounded(gate * up))  # [T, F]
    return keep("ffn_out", rounded(linear(hidden, w.w2)))  # [T, F] -> [T, D]


def transformer_block(x: np.ndarray, w: LayerWeights, rotation: Rotation, caches: Sequence[LayerCache],
                      config: ModelConfig, mode: ComputeMode = FLOAT32,
                      keep: Keep = keep_nothing) -> np.ndarray:  # [T, D] -> [T, D]
    """h = x + attention(rmsnorm(x)); out = h + swiglu(rmsnorm(h)).

    Low precision: each residual sum rounded (HF LlamaDecoderLayer.forward: `residual +
    hidden_states`; Meta TransformerBlock.forward: `x + self.attention(...)`, in the dtype).

    Source: the Llama 3 paper's pre-norm block (arXiv 2407.21783); llama-models TransformerBlock.
    """
    rounded, eps = mode.rounded, config.norm_eps
    attn_norm = keep("attn_norm", rmsnorm(x, w.attention_norm, eps, mode))  # [T, D]
    h = keep("h", rounded(x + attention(attn_norm, w.attention, rotation, caches, config, mode, keep)))
    ffn_norm = keep("ffn_norm", rmsnorm(h, w.ffn_norm, eps, mode))  # [T, D]
    return keep("out", rounded(h + swiglu(ffn_norm, w.feed_forward, mode, keep)))  # [T, D]


def transformer_layers(x: np.ndarray, weights: Mapping[str, np.ndarray], config: ModelConfig, rotation: Rotation,
                       caches: Sequence[tuple["KVCache", slice]], mode: ComputeMode = FLOAT32,
                       trace: Optional[Trace] = None, first: int = 0) -> np.ndarray:  # [T, D] -> [T, D]
    """The residual stream through layers `first` .. n_layers-1, each sequence's rows (`caches`: one
    (cache, rows) per sequence) attending to its own cache's slice of the layer. `trace` records
    the named stages `layers.i.*`.

    Source: llama-models Transformer.forward's `for layer in self.layers: h = layer(h, ...)`."""
    for layer in range(first, config.n_layers):
        prefix = f"layers.{layer}."
        layer_caches = [cache.layer(layer, rows) for cache, rows in caches]
        x = transformer_block(x, layer_weights(weights, layer, config, mode), rotation, layer_caches, config, mode,
                              finite_stages(scoped(trace, prefix), prefix, mode))
    return x


def forward(weights: Mapping[str, np.ndarray], config: ModelConfig, tokens,
            cache: Optional[KVCache] = None, pos: Optional[int] = None,
            trace: Optional[Trace] = None, last_only: bool = False,
            compute: str | ComputeMode | None = None,
            start_from: Optional[tuple[str, np.ndarray]] = None) -> np.ndarray:  # [T] -> [T, V]
    """Logits for each of `tokens`, the first at rope position `pos`.

    tokens: token ids (a list or int array, [T]); weights: canonical names, float32 or bfloat16
    (or as `load_model(compute=...)` holds them for the mode: float64, float16; others are
    converted in every call, `ComputeMode.weight`); returns logits [T, V] in the compute mode's
    working dtype (float32, or float64; bfloat16/float16 values as float32; with `last_only`,
    only the last token's, [1, V]: all that generation needs after a prefill). The tokens attend
    to what `cache` holds (from earlier calls) and to each other, causally, and are added to it;
    without a cache they attend only to each other. `pos` defaults to the number of tokens the
    cache holds (0 without a cache): the tokens continue what was fed before. `trace` records the
    named stages (`llama3_np.stages`). `compute` is the compute mode (`config.ComputeMode`, or its
    name: "float32", the default, "float64", "bfloat16", "float16"); the cache's own mode when
    None, which a given mode must equal.
    Raises Llama3Error for token ids outside the vocabulary, a full cache or a negative position;
    ParameterError("compute") for an unknown mode, one the cache was not made for, and a float16
    run whose activations overflow (naming the first stage that does).
    Interventions: `trace`'s edits (`stages.Edit`) change stages as they are computed, and
    `start_from` = (name, value) resumes the residual stream at `embed` or `layers.i.out` ([T, D])
    and runs only the layers after it (their keys and values alone enter the cache, so it takes
    no cache that could be used again); Llama3Error for a `start_from` at another stage, of another
    shape or with a cache. Several sequences in one pass, each with its own cache: `forward_batch`.

    Source: llama-models Transformer.forward; HF LlamaForCausalLM.forward (logits in the dtype:
    `lm_head(hidden_states)`; Meta's `self.output(h).float()` is the same values in float32).
    """
    if cache is None:
        cache = KVCache(config, np.size(tokens), compute or FLOAT32)
    mode = forward_mode(compute, cache.mode)
    start = cache.length  # these tokens go into cache slots start .. start+T-1
    pos = start if pos is None else pos
    tokens = forward_arguments(tokens, config.vocab_size, start, cache.max_len, pos)  # [T]
    T = tokens.shape[0]
    rotation = rope_cos_sin(pos + np.arange(T), frequencies(config, mode))  # [T, Dh/2] each
    keep = finite_stages(scoped(trace, ""), "", mode)
    x = keep("embed", expect_shape(embed(tokens, weights["tok_embeddings.weight"], mode), (T, config.dim), "embed"))
    first = 0
    if start_from is not None:  # an intervention: the residual stream resumes from a given value
        first, x = start_point(start_from, config.n_layers, x, cache.length, cache.max_len)
    x = transformer_layers(x, weights, config, rotation, [(cache, slice(None))], mode, trace, first)
    cache.length = start + T  # every layer now holds these tokens: the cache advances once, here
    if last_only:
        x = x[-1:]
    return output_logits(x, weights, config, mode, keep)  # [T, D] -> [T, V]


def output_logits(x: np.ndarray, weights: Mapping[str, np.ndarray], config: ModelConfig,
                  mode: ComputeMode = FLOAT32, keep: Keep = keep_nothing) -> np.ndarray:  # [T, D] -> [T, V]
    """The last layer's output normalised, then projected to the vocabulary: output · rmsnorm(x).

    Source: llama-models Transformer.forward's `self.norm(h)` and `self.output(h)`."""
    x = keep("norm", rmsnorm(x, mode.weight(weights["norm.weight"], "norm.weight"), config.norm_eps, mode))
    logits = keep("logits", mode.rounded(linear(x, mode.weight(weights["output.weight"], "output.weight"))))  # [T, D] -> [T, V]
    return expect_shape(logits, (x.shape[0], config.vocab_size), "logits")


def forward_batch(weights: Mapping[str, np.ndarray], config: ModelConfig, batch: Sequence,
                  caches: Optional[Sequence[KVCache]] = None, positions: Optional[Sequence[int]] = None,
                  last_only: bool = False, compute: str | ComputeMode | None = None) -> list[np.ndarray]:
    # B x [T_b] -> B x [T_b, V]
    """`forward` of B sequences at once: each sequence's logits, in the order of `batch`.

    batch: B token-id lists (any lengths); caches: one `KVCache` per sequence (None: a fresh one
    each, as `forward` without a cache), each extended by its sequence's tokens; positions: the
    rope position of each sequence's first token (None: each cache's length). Returns B arrays,
    [T_b, V] each, or [1, V] with `last_only`. The B sequences' tokens are the rows of one pass
    (the legend's batch), so every weight is read once for all of them; each sequence attends to
    its own tokens and cache only, and no padding is involved.

    Batch invariance: each sequence's logits are the sums of `forward` of that sequence alone, in
    another order where a weight product chooses its kernel by the number of rows (docs/DESIGN.md,
    "Batches"), so they equal within float32 rounding and give the same greedy ids; bit for bit
    under `products.set_batch_invariant(True)`, which computes every row by the same kernel.
    Raises Llama3Error as `forward` does for any of the sequences (naming it), for an empty batch
    and for caches or positions not one per sequence; ParameterError("compute") as `forward`,
    and when the caches were made for different modes.

    Source: llama.cpp's llama_batch (tokens of several sequences, each with its position and
    sequence id, in one llama_decode); vLLM's flattened batches.
    """
    if caches is None:
        caches = [KVCache(config, np.size(tokens), compute or FLOAT32) for tokens in batch]
    starts = [c.length for c in caches]
    positions = starts if positions is None else list(positions)
    mode, tokens = batch_arguments(batch, caches, positions, compute, config.vocab_size)  # B x [T_b]
    ends = np.cumsum([t.size for t in tokens])
    rows = [slice(end - t.size, end) for t, end in zip(tokens, ends)]  # each sequence's rows of the pass
    rotation = rope_cos_sin(np.concatenate([p + np.arange(t.size) for p, t in zip(positions, tokens)]),
                            frequencies(config, mode))  # [T, Dh/2] each
    x = embed(np.concatenate(tokens), weights["tok_embeddings.weight"], mode)  # [T, D]
    x = transformer_layers(x, weights, config, rotation, list(zip(caches, rows)), mode)
    for c, start, t in zip(caches, starts, tokens):
        c.length = start + t.size  # every layer now holds each sequence's tokens
    if last_only:
        x, rows = x[ends - 1], [slice(b, b + 1) for b in range(len(rows))]  # [B, D]
    logits = output_logits(x, weights, config, mode, finite_stages(keep_nothing, "", mode))  # [T, V]
    return [logits[r] for r in rows]
