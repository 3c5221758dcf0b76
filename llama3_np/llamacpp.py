"""llama.cpp's CPU arithmetic, as a readable specification: what compute mode "llamacpp" changes.

llama.cpp computes a Llama 3 forward pass in float32, as llama3_np's default does, except at the
operands of its products. These are the places, read from the source llama-cpp-python 0.3.36
builds (vendor/llama.cpp; ggml/src/ggml-cpu/ is its CPU backend), on x86-64 with AVX2 or AVX-512:

1. **A product with a weight converts the activation rows first.** `ggml_mul_mat(w, x)` turns
   every float32 row of x into w's `vec_dot_type` (ggml-cpu.c, `type_traits_cpu` and
   `ggml_compute_forward_mul_mat`; the llamafile sgemm and the repacked Q4_0/Q4_K kernels do the
   same conversion), then takes each dot product block by block (`VEC_DOT_TYPES` below):
   - F32 weights: nothing; F16: the row rounded to float16; BF16: rounded to bfloat16.
   - Q4_0, Q5_0, Q8_0: Q8_0, blocks of 32 (`quantize_q8_0`).
   - Q4_1, Q5_1: Q8_1, Q8_0's blocks with s = d·Σq kept as a float16 (`quantize_q8_1`), which
     the dot product uses for the weight's offset m in place of the row's own sum.
   - Q4_K, Q5_K, Q6_K (and the other K-quants): Q8_K, blocks of 256 with a float32 scale
     (`quantize_q8_k`).
   Within a block the dot product is an exact integer sum scaled by the product of the two scales
   (ggml_vec_dot_q4_0_q8_0, ..., arch/x86/quants.c): its value is the float32 product of the two
   dequantized rows up to the order of float32 sums, and so is computed here (`product`), with
   Q8_1's s added as a correction: Σ_b m_b · (s_b − d_b·Σq_b).
2. **The KV cache holds float16** (llama.cpp's default cache types, -ctk f16 -ctv f16): keys after
   rope and values are rounded as they are stored, then read by the attention in float16.
3. **Attention without flash attention**, llama-cpp-python's default (`Llama(flash_attn=False)`
   sets LLAMA_FLASH_ATTN_TYPE_DISABLED; llama.cpp's own tools default to "auto", which turns it on
   for the CPU). llm_graph_context::build_attn_mha multiplies kq = K·q, a product with the float16
   cache, so q is rounded to float16 first (F16's vec_dot_type); softmax(kq·scale + mask) in
   float32 (ggml_soft_max_ext); then V·probs, a product with the float16 cache again, so the
   probabilities are rounded to float16 first (`kv_operand`).

Everything else is float32 in both (embedding rows dequantized exactly, rmsnorm, rope, silu, the
residual sums), and differs from llama3_np's only by the order and rounding of float32 operations:
llama.cpp sums rmsnorm's squares in double and multiplies by 1/sqrt, computes rope's angles by
repeated multiplication θ_i = θ_(i-1)·base^(-2/Dh), scales the attention scores by a product with
1/√Dh (exact for Dh = 64), takes exp in its own SIMD polynomial, and its kernels sum dot products
in their own order. Those differences are measured, not emulated: each stage recomputed from
llama.cpp's own input agrees to NMSE 1e-12, but a last-bit difference can move a Q8 rounding, and
on a deep model such moves grow into the quantization's own noise (docs/DESIGN.md, "Numerical facts").

Rounding (x86, AVX2 and AVX-512 builds): Q8_0 and Q8_1 round x·(127/amax) to the nearest integer,
ties to even (`_mm256_round_ps`; the scalar reference's roundf rounds ties away from zero, and
gguf-py copies the reference); Q8_K rounds ties to even as well (nearest_int's 1.5·2²³ trick);
float16 and bfloat16 conversions round to nearest even (F16C, ggml_compute_fp32_to_bf16).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from . import products
from .dtypes import bfloat16, is_bfloat16
from .formats.ggml_blocks import QK, QK_K, QuantizedWeight

F32 = np.float32

# The type a weight's activation operand is converted to, by the weight's storage type
# (ggml-cpu.c type_traits_cpu[...].vec_dot_type, x86 builds).
VEC_DOT_TYPES = {
    "F32": "F32", "F16": "F16", "BF16": "BF16",
    "Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0",
    "Q4_1": "Q8_1", "Q5_1": "Q8_1",
    "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K",
}


# --- the activation quantizers -----------------------------------------------------------------

def _q8_blocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # [T, n] float32 -> d [T, n/32] float32, qs [T, n/32, 32] int8
    blocks = np.asarray(x, dtype=F32).reshape(*x.shape[:-1], -1, QK)  # [T, n/32, 32]
    amax = np.abs(blocks).max(axis=-1)  # [T, n/32]
    with np.errstate(divide="ignore"):
        inverse = np.where(amax != 0, F32(127) / amax, F32(0)).astype(F32)
    return amax / F32(127), np.rint(blocks * inverse[..., None]).astype(np.int8)


def quantize_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # [T, n] float32 -> d [T, n/32] float16, qs [T, n/32, 32] int8
    """Q8_0 blocks of activation rows, as ggml's CPU backend makes them (quantize_row_q8_0,
    arch/x86/quants.c, AVX2 path): per block of 32, amax = max |x|, d = amax / 127 stored as
    float16, q = round(x · (127 / amax)) ties to even (0 where amax is 0). The multiplier is
    127 / amax in float32, not 1 / d."""
    d, qs = _q8_blocks(x)
    return d.astype(np.float16), qs


def quantize_q8_1(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # [T, n] float32 -> d [T, n/32] float16, s [T, n/32] float16, qs [T, n/32, 32] int8
    """Q8_1 blocks: Q8_0's d and qs, and s = d · Σq in float32 (d before its float16 rounding),
    stored as float16 (quantize_row_q8_1, AVX2 path)."""
    d, qs = _q8_blocks(x)
    s = d * qs.sum(axis=-1, dtype=np.int32).astype(F32)
    return d.astype(np.float16), s.astype(np.float16), qs


def quantize_q8_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # [T, n] float32 -> d [T, n/256] float32, qs [T, n/256, 256] int8
    """Q8_K super-blocks of activation rows (quantize_row_q8_K_ref, which x86 builds use): per
    block of 256, max = the first value of largest magnitude (with its sign), iscale = -127 / max,
    q = min(127, round(iscale · x)) ties to even, d = 1 / iscale in float32 (0 and q = 0 where every
    value is 0). The repacked Q4_K kernels' quantizer (ggml_quantize_mat_q8_K_4x8) may take the
    other sign when +amax and -amax both occur; d·q is the same value."""
    blocks = np.asarray(x, dtype=F32).reshape(*x.shape[:-1], -1, QK_K)  # [T, n/256, 256]
    first = np.abs(blocks).argmax(axis=-1)[..., None]
    peak = np.take_along_axis(blocks, first, axis=-1)[..., 0]  # [T, n/256]
    with np.errstate(divide="ignore"):
        iscale = np.where(peak != 0, F32(-127) / peak, F32(0)).astype(F32)
        d = np.where(peak != 0, F32(1) / iscale, F32(0)).astype(F32)
    qs = np.minimum(np.rint(blocks * iscale[..., None]), 127).astype(np.int8)
    return d, qs


def activation_operand(x: np.ndarray, vec_dot_type: str) -> np.ndarray:  # [T, n] -> [T, n] float32
    """The values a product with a weight of that vec_dot_type multiplies instead of x's: x itself
    for F32, rounded to float16 or bfloat16, or its Q8_0 / Q8_1 / Q8_K blocks dequantized
    (d · q: exact in float32 for the float16 scales, one rounding for Q8_K's float32 scale)."""
    return _operand(x, vec_dot_type)[0]


def _operand(x: np.ndarray, vec_dot_type: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
    # [T, n] -> operand [T, n] float32, and for Q8_1 the offsets' correction [T, n/32] float32
    """`activation_operand`, and for a Q8_1 operand its blocks' s − d·Σq (`product`), from one
    quantization of x (Q8_1's d and qs are Q8_0's: `quantize_q8_1`)."""
    T, n = x.shape
    if vec_dot_type == "F32":
        return x, None
    if vec_dot_type in ("F16", "BF16"):
        storage = np.float16 if vec_dot_type == "F16" else bfloat16()
        return x.astype(storage).astype(F32), None
    if vec_dot_type == "Q8_K":
        d, qs = quantize_q8_k(x)
        return (d[..., None] * qs.astype(F32)).reshape(T, n), None
    if vec_dot_type == "Q8_1":
        d, s, qs = quantize_q8_1(x)
    else:
        (d, qs), s = quantize_q8_0(x), None
    d = d.astype(F32)  # [T, n/32]: the float16 scale, exactly
    operand = (d[..., None] * qs.astype(F32)).reshape(T, n)
    if s is None:
        return operand, None
    return operand, s.astype(F32) - d * qs.sum(axis=-1, dtype=np.int32).astype(F32)


def storage_type(w) -> str:
    """A weight's ggml storage type: a QuantizedWeight's own, else its array dtype's name."""
    if isinstance(w, QuantizedWeight):
        return w.type.name
    if is_bfloat16(w.dtype):
        return "BF16"
    return {"float32": "F32", "float16": "F16"}.get(np.dtype(w.dtype).name, np.dtype(w.dtype).name)


# --- the product --------------------------------------------------------------------------------

class LlamaCppWeight:
    """A weight [n_out, n_in] that `linear` multiplies as llama.cpp's CPU backend does (`product`).

    `base` is the weight as stored: a `QuantizedWeight`, or a float32, float16 or bfloat16 array.
    Raises ValueError for a storage type llama.cpp has no vec_dot_type for here."""

    ndim = 2

    def __init__(self, base):
        self.base = base
        self.type = storage_type(base)
        if self.type not in VEC_DOT_TYPES:
            raise ValueError(f"no llama.cpp activation type known for weights of type {self.type}")
        self.vec_dot_type = VEC_DOT_TYPES[self.type]
        self.shape = tuple(base.shape)
        self.dtype = base.dtype
        # A Q4_1 or Q5_1 weight's block offsets m [n_out, n_in/32] as float32 for `product`'s Q8_1
        # term, converted once here (exactly: m is stored as float16), not in every product.
        self.offsets = base.raw.view(base.type.block)["m"].astype(F32) if self.vec_dot_type == "Q8_1" else None

    @property
    def nbytes(self) -> int:  # the stored bytes (`xcheck.bench.held_bytes`)
        return self.base.nbytes

    @property
    def itemsize(self) -> float:  # the stored bytes per value
        return self.base.itemsize

    def __getitem__(self, ids):  # the embedding lookup (ggml_get_rows): the stored rows, exact
        return self.base[ids]

    def __repr__(self):
        return f"LlamaCppWeight({self.type}, activations as {self.vec_dot_type})"


def product(x: np.ndarray, w: LlamaCppWeight) -> np.ndarray:  # [T, n_in], [n_out, n_in] -> [T, n_out]
    """x · wᵀ as ggml_mul_mat computes it: x's rows converted to w's vec_dot_type, multiplied by
    w's exact values (`products.linear`), and for a Q8_1 operand the float16 s in place of d·Σq in
    the weight offsets' term: + Σ_b m[o, b] · (s[t, b] − d[t, b]·Σq[t, b])
    (ggml_vec_dot_q4_1_q8_1: `summs += m · s`)."""
    operand, correction = _operand(x, w.vec_dot_type)  # [T, n_in]; Q8_1: [T, nb]
    out = products.linear(operand, w.base)
    if correction is not None:
        out += correction @ w.offsets.T  # [T, nb] @ [nb, n_out]
    return out


def llamacpp_weight(w, name: str = ""):
    """A weight as compute mode "llamacpp" multiplies it: a matrix wrapped as LlamaCppWeight
    (`linear` then calls `product`); a vector (a norm's weight) as it is."""
    if isinstance(w, LlamaCppWeight) or getattr(w, "ndim", 2) != 2:
        return w
    return LlamaCppWeight(w)


def kv_operand(x: np.ndarray) -> Optional[np.ndarray]:  # [...] float32 -> [...] float32
    """A float32 operand of a product with the float16 KV cache (q for K·q, the probabilities for
    V·probs), rounded to float16 as ggml_mul_mat converts it to F16's vec_dot_type."""
    return x.astype(np.float16).astype(F32)
