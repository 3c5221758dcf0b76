"""The backward pass of Llama 3 as plain NumPy functions: the gradient of every stage of
`llama3_np.model`, beside the forward it differentiates.

Each `*_backward` function takes what its forward took (or saved) and the gradient of the loss with
respect to the forward's output, `d_out`, and returns the gradients with respect to the forward's
inputs and weights. Gradients are written `d_name` for dL/d(name), in the dimension legend of
`llama3_np.model` (T tokens, D model dim, F feed-forward dim, H / KV heads, Dh head dim, V vocabulary).
Every function computes in the dtype of its arguments: float32 as the model computes, or float64.

`loss_and_gradients` composes them: one forward pass recorded on a `Tape` (a `Trace` that keeps every
stage, attention probabilities included, in its own dtype), the cross-entropy of the next tokens,
then the stages' backward functions in reverse stage order. The gradient of a weight has the
weight's canonical name; with tied embeddings (`config.tie_embeddings`) the output projection's
gradient is added into `tok_embeddings.weight`'s.

Source for every rule: the chain rule; the references the tests hold these to are the gradients of
`torch.autograd` through Hugging Face `transformers`' `LlamaForCausalLM` (tools/make_grad_fixtures.py).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np

from .checks import expect_shape, forward_arguments
from .config import ComputeMode, ModelConfig
from .errors import Llama3Error, ParameterError
from .linear import linear
from .model import FeedForwardWeights, LayerWeights, forward, rope_cos_sin, rope_frequencies, silu
from .stages import Keep, Trace, keep_nothing, scoped


# The target of a position that is not scored (torch.nn.functional.cross_entropy's default).
IGNORE_INDEX = -100

# ---------------------------------------------------------------------------------------------
# The stages, one backward each


def linear_backward(x: np.ndarray, w: np.ndarray, d_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # [T, n_in], [n_out, n_in], [T, n_out] -> [T, n_in], [n_out, n_in]
    """Of y = x · wᵀ: dL/dx = d_out · w and dL/dw = d_outᵀ · x (a sum over the T tokens)."""
    return d_out @ np.asarray(w, dtype=d_out.dtype), d_out.T @ x


def embed_backward(tokens: np.ndarray, d_out: np.ndarray, vocab_size: int) -> np.ndarray:
    # [T], [T, D] -> [V, D]
    """Of x = tok_embeddings[tokens]: each token's row receives the gradient of every position that
    looked it up (a scatter-add: a token seen twice receives both gradients)."""
    d_table = np.zeros((vocab_size, d_out.shape[-1]), dtype=d_out.dtype)
    np.add.at(d_table, tokens, d_out)
    return d_table


def rmsnorm_backward(x: np.ndarray, weight: np.ndarray, eps: float,
                     d_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # [T, D], [D], [T, D] -> [T, D], [D]
    """Of y = n · g with n = x · r, r = (mean(x²) + eps)^(-1/2), per row:

        dL/dg = Σ_t d_out ⊙ n
        dL/dx = r · (d_n - n · mean(d_n ⊙ n))      with d_n = d_out ⊙ g

    because dr/dx_j = -r³ x_j / D, so dL/dx_j = r d_n_j - (r³ x_j / D) Σ_i d_n_i x_i, and
    r² x_j Σ_i d_n_i x_i / D = n_j · mean(d_n ⊙ n). The second term removes from d_n its component
    along n: scaling a row does not change its norm's output.
    """
    g = weight.astype(x.dtype, copy=False)
    r = 1 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + x.dtype.type(eps))  # [T, 1]
    n = x * r
    d_n = d_out * g
    d_x = r * (d_n - n * np.mean(d_n * n, axis=-1, keepdims=True))
    return d_x, np.sum(d_out * n, axis=0)


def rope_backward(d_out: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    # [T, n, Dh], [T, Dh/2], [T, Dh/2] -> [T, n, Dh]
    """Of the rotation of each pair (x[2i], x[2i+1]) by θ: a rotation's Jacobian is orthogonal, so
    the gradient is d_out rotated by -θ (its transpose):
    dL/da = d_a·cos + d_b·sin, dL/db = -d_a·sin + d_b·cos."""
    T, n, Dh = d_out.shape
    expect_shape(cos, (T, Dh // 2), "rope cos")
    d_a, d_b = d_out[..., 0::2], d_out[..., 1::2]
    c, s = cos[:, None, :].astype(d_out.dtype), sin[:, None, :].astype(d_out.dtype)  # [T, 1, Dh/2]
    d_x = np.empty_like(d_out)
    d_x[..., 0::2] = d_a * c + d_b * s
    d_x[..., 1::2] = d_b * c - d_a * s
    return d_x


def softmax_backward(probs: np.ndarray, d_probs: np.ndarray) -> np.ndarray:  # [..., S] -> [..., S]
    """Of p = softmax(z) along the last axis: dL/dz = p ⊙ (d_p - Σ_s d_p ⊙ p). Masked entries
    (p = 0) receive no gradient."""
    return probs * (d_probs - np.sum(d_probs * probs, axis=-1, keepdims=True))


def causal_attention_backward(q: np.ndarray, keys: np.ndarray, values: np.ndarray, probs: np.ndarray,
                              d_out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # [T, H, Dh], [KV, T, Dh], [KV, T, Dh], [H, T, T], [T, H, Dh] -> [T, H, Dh], [KV, T, Dh], [KV, T, Dh]
    """Of o = P · v with P = softmax(q · kᵀ / √Dh + causal mask), per query head, keys and values
    shared by the H/KV query heads of a group (`model.causal_attention`):

        dL/dv = Σ_group Pᵀ · d_o       dL/dP = d_o · vᵀ       dL/dscores = softmax_backward(P, dL/dP)
        dL/dq = dL/dscores · k / √Dh   dL/dk = Σ_group dL/dscoresᵀ · q / √Dh

    A key or value head's gradient sums over the query heads that read it (GQA, arXiv 2305.13245).
    """
    T, H, Dh = q.shape
    KV = keys.shape[0]
    n_rep = H // KV
    scale = q.dtype.type(1 / math.sqrt(Dh))
    p = probs.reshape(KV, n_rep, T, T)
    q_groups = q.reshape(T, KV, n_rep, Dh).transpose(1, 2, 0, 3)  # [KV, H/KV, T, Dh]
    d_o = d_out.reshape(T, KV, n_rep, Dh).transpose(1, 2, 0, 3)  # [KV, H/KV, T, Dh]
    d_values = np.sum(p.swapaxes(-1, -2) @ d_o, axis=1)  # [KV, T, Dh]
    d_scores = softmax_backward(p, d_o @ values[:, None].swapaxes(-1, -2)) * scale  # [KV, H/KV, T, T]
    d_q = d_scores @ keys[:, None]  # [KV, H/KV, T, Dh]
    d_keys = np.sum(d_scores.swapaxes(-1, -2) @ q_groups, axis=1)  # [KV, T, Dh]
    return d_q.transpose(2, 0, 1, 3).reshape(T, H, Dh), d_keys, d_values


def silu_backward(x: np.ndarray, d_out: np.ndarray) -> np.ndarray:  # [...] -> [...]
    """Of silu(x) = x·σ(x): d silu/dx = σ(x) · (1 + x·(1 - σ(x)))."""
    with np.errstate(over="ignore"):
        sigma = 1 / (1 + np.exp(-x))
    return d_out * sigma * (1 + x * (1 - sigma))


def swiglu_backward(x: np.ndarray, w: FeedForwardWeights, d_out: np.ndarray,
                    keep: Keep = keep_nothing) -> tuple[np.ndarray, FeedForwardWeights]:
    # [T, D], [T, D] -> [T, D], gradients of (w1 [F, D], w2 [D, F], w3 [F, D])
    """Of w2 · (silu(gate) ⊙ up) with gate = w1 · x, up = w3 · x (`model.swiglu`):

        dL/dhidden = d_out · w2        dL/dgate = dL/dhidden ⊙ up ⊙ silu'(gate)
        dL/dup = dL/dhidden ⊙ silu(gate)      dL/dx = dL/dgate · w1 + dL/dup · w3

    gate and up are recomputed from x (two products) rather than kept by the forward pass.
    """
    gate, up = linear(x, w.w1), linear(x, w.w3)  # [T, F] each
    d_hidden, d_w2 = linear_backward(silu(gate) * up, w.w2, d_out)
    keep("ffn_hidden", d_hidden)
    d_x_gate, d_w1 = linear_backward(x, w.w1, silu_backward(gate, d_hidden * up))
    d_x_up, d_w3 = linear_backward(x, w.w3, d_hidden * silu(gate))
    return d_x_gate + d_x_up, FeedForwardWeights(w1=d_w1, w2=d_w2, w3=d_w3)


def cross_entropy(logits: np.ndarray, targets: np.ndarray,
                  ignore_index: int = IGNORE_INDEX) -> tuple[float, np.ndarray]:  # [T, V], [T] -> loss, [T, V]
    """The mean negative log-likelihood of `targets` and its gradient with respect to `logits`.

    loss = -(1/N) Σ_t log softmax(logits_t)[target_t] over the N positions whose target is not
    `ignore_index`; dL/dlogits_t = (softmax(logits_t) - onehot(target_t)) / N, zero where ignored.
    Same definition and default `ignore_index` as `torch.nn.functional.cross_entropy`.
    Raises Llama3Error when every target is ignored.
    """
    scored = targets != ignore_index
    n = int(np.count_nonzero(scored))
    if n == 0:
        raise Llama3Error("cross_entropy needs at least one target that is not ignored")
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))
    log_probs = shifted - log_z  # [T, V]
    rows = np.nonzero(scored)[0]
    loss = -float(np.sum(log_probs[rows, targets[rows]])) / n
    d_logits = np.exp(log_probs)
    d_logits[rows, targets[rows]] -= 1
    d_logits[~scored] = 0
    return loss, d_logits / logits.dtype.type(n)


# ---------------------------------------------------------------------------------------------
# The whole model


class Tape(Trace):
    """A `Trace` of every stage of one forward pass, attention probabilities included, each kept in
    the dtype it was computed in: what the backward pass reads."""

    def __init__(self):
        super().__init__(("*", "layers.*.probs"))

    def record(self, name: str, x: np.ndarray) -> None:
        self[name] = np.array(x)  # a copy, in x's own dtype


def model_backward(weights: Mapping[str, np.ndarray], config: ModelConfig, tokens: np.ndarray,
                   pos: int, tape: Mapping[str, np.ndarray], d_logits: np.ndarray,
                   trace: Optional[Trace] = None) -> dict[str, np.ndarray]:
    # [T], [T, V] -> {canonical weight name: gradient of the weight's shape}
    """The gradient of every weight, given the stages of the forward pass over `tokens` (from rope
    position `pos`, without a cache) and dL/dlogits: the stages' backward functions in reverse
    stage order. The residual stream's gradient flows through both branches of each residual add
    (h = x + attn_out, out = h + ffn_out). Gradients are in d_logits' dtype (the forward's compute
    mode: float32 or float64). `trace` records dL/d(stage) under each stage's own name (`stages.py`).
    """
    T = tokens.shape[0]
    H, KV, Dh, eps = config.n_heads, config.n_kv_heads, config.head_dim, config.norm_eps
    mode = ComputeMode.of(d_logits.dtype.name)
    cos, sin = rope_cos_sin(pos + np.arange(T), rope_frequencies(config, mode))  # [T, Dh/2] each
    keep = scoped(trace, "")
    grads: dict[str, np.ndarray] = {}

    d_norm, grads["output.weight"] = linear_backward(tape["norm"], weights["output.weight"],
                                                     keep("logits", d_logits))
    last_out = tape[f"layers.{config.n_layers - 1}.out"]
    d_x, grads["norm.weight"] = rmsnorm_backward(last_out, weights["norm.weight"], eps, keep("norm", d_norm))

    for layer in reversed(range(config.n_layers)):
        prefix = f"layers.{layer}."
        keep = scoped(trace, prefix)
        w = LayerWeights.of(weights, layer, config)

        def stage(name):
            return tape[prefix + name]

        x = tape[f"layers.{layer - 1}.out"] if layer > 0 else tape["embed"]
        # out = h + swiglu(rmsnorm(h)): dL/dout reaches h directly and through the feed-forward branch.
        d_ffn_norm, d_ffn = swiglu_backward(stage("ffn_norm"), w.feed_forward, keep("ffn_out", keep("out", d_x)), keep)
        d_h_norm, grads[prefix + "ffn_norm.weight"] = rmsnorm_backward(stage("h"), w.ffn_norm, eps,
                                                                      keep("ffn_norm", d_ffn_norm))
        d_h = keep("h", d_x + d_h_norm)
        # h = x + wo · attention(rope(wq a), rope(wk a), wv a) with a = rmsnorm(x).
        d_attn, grads[prefix + "attention.wo.weight"] = linear_backward(stage("attn"), w.attention.wo,
                                                                       keep("attn_out", d_h))
        keys, values = stage("k_rope").transpose(1, 0, 2), stage("v").transpose(1, 0, 2)  # [KV, T, Dh] each
        d_q_rope, d_keys, d_values = causal_attention_backward(
            stage("q_rope"), keys, values, stage("probs"), keep("attn", d_attn).reshape(T, H, Dh))
        d_k_rope = keep("k_rope", d_keys.transpose(1, 0, 2))  # [KV, T, Dh] -> [T, KV, Dh]
        d_q = keep("q", rope_backward(keep("q_rope", d_q_rope), cos, sin)).reshape(T, H * Dh)
        d_k = keep("k", rope_backward(d_k_rope, cos, sin)).reshape(T, KV * Dh)
        d_v = keep("v", d_values.transpose(1, 0, 2)).reshape(T, KV * Dh)
        attn_norm = stage("attn_norm")
        d_a_q, grads[prefix + "attention.wq.weight"] = linear_backward(attn_norm, w.attention.wq, d_q)
        d_a_k, grads[prefix + "attention.wk.weight"] = linear_backward(attn_norm, w.attention.wk, d_k)
        d_a_v, grads[prefix + "attention.wv.weight"] = linear_backward(attn_norm, w.attention.wv, d_v)
        d_x_norm, grads[prefix + "attention_norm.weight"] = rmsnorm_backward(
            x, w.attention_norm, eps, keep("attn_norm", d_a_q + d_a_k + d_a_v))
        for name in ("w1", "w2", "w3"):
            grads[prefix + f"feed_forward.{name}.weight"] = getattr(d_ffn, name)
        d_x = d_h + d_x_norm

    d_table = embed_backward(tokens, scoped(trace, "")("embed", d_x), config.vocab_size)
    if config.tie_embeddings:
        d_table += grads.pop("output.weight")
    grads["tok_embeddings.weight"] = d_table
    return {name: grads[name] for name in sorted(grads)}


def loss_and_gradients(weights: Mapping[str, np.ndarray], config: ModelConfig, tokens,
                       targets=None, pos: int = 0, compute: str = "float32", ignore_index: int = IGNORE_INDEX,
                       trace: Optional[Trace] = None) -> tuple[float, dict[str, np.ndarray]]:
    """The next-token cross-entropy of `tokens` and its gradient with respect to every weight.

    tokens: ids [T] fed from rope position `pos`; targets: the id each position should predict [T]
    (default: the next token, the last position ignored), `ignore_index` where a position is not
    scored; compute: the forward's compute mode ("float32" or "float64"), which the gradients are
    in. Returns (loss, {canonical weight name: dL/dweight}). `trace` records dL/d(stage) of the
    named stages. Raises Llama3Error for bad ids, targets of another length, or nothing scored, and
    ParameterError("compute") for a mode other than float32 and float64.
    """
    if ComputeMode.of(compute).dtype not in ("float32", "float64"):
        raise ParameterError("compute", f"the backward pass computes in float32 or float64, not {compute}")
    ids = forward_arguments(tokens, config.vocab_size, 0, np.size(tokens), pos)
    if targets is None:
        targets = np.append(ids[1:], ignore_index)
    targets = np.asarray(targets, dtype=np.int64)
    if targets.shape != ids.shape:
        raise Llama3Error(f"targets must have one id per token ({ids.shape[0]}), got shape {targets.shape}")
    tape = Tape()
    logits = forward(weights, config, ids, pos=pos, trace=tape, compute=compute)
    loss, d_logits = cross_entropy(logits, targets, ignore_index)
    return loss, model_backward(weights, config, ids, pos, tape, d_logits, trace)
