"""ggml's tensor storage types, as readable specifications: the block layout as a NumPy structured
dtype and one dequantizer per type, each with its formula and the ggml source it follows.

A quantized row of n values is n / block_size blocks stored one after another; ggml never cuts a
block across rows (`ggml_row_size` asserts that the row length is a multiple of the block size),
so a row, and any run of whole rows, dequantizes by itself. Every dequantizer maps an array of
blocks [..., n_blocks] (the structured dtype below) to float32 values [..., n_blocks * block_size].

Sources (llama.cpp, ggml/src): `ggml-common.h` declares the blocks (block_q4_0, ..., block_q6_K),
`ggml-quants.c` dequantizes them (dequantize_row_q4_0, ..., dequantize_row_q6_K), `ggml.c`
`type_traits` gives each type's block size and bytes.

The arithmetic is float32 in the order ggml's C source writes it, one rounding per operation
(scale · quant, then ± the offset), and that is the order of the `gguf` package's NumPy
dequantizers (`gguf.quants.dequantize`), to which every function here is proven bit-equal
(tests/formats/test_ggml_blocks.py). A C compiler may contract ggml's `d * q + m` into one fused
multiply-add; a NumPy value never is, so the reference here is the unfused one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

QK = 32  # values per block of the 32-blocks (QK4_0 = QK4_1 = QK5_0 = QK5_1 = QK8_0 in ggml-common.h)
QK_K = 256  # values per super-block of the K-quants
K_SCALE_SIZE = 12  # bytes of packed 6-bit scales and mins in a Q4_K / Q5_K super-block

# --- the blocks (ggml-common.h), little-endian and packed -----------------------------------------

BLOCK_Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", QK)])
BLOCK_Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", QK // 2)])
BLOCK_Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", QK // 2)])
BLOCK_Q5_0 = np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", QK // 2)])
BLOCK_Q5_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", QK // 2)])
BLOCK_Q4_K = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", K_SCALE_SIZE), ("qs", "u1", QK_K // 2)])
BLOCK_Q5_K = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", K_SCALE_SIZE), ("qh", "u1", QK_K // 8),
                       ("qs", "u1", QK_K // 2)])
BLOCK_Q6_K = np.dtype([("ql", "u1", QK_K // 2), ("qh", "u1", QK_K // 4), ("scales", "i1", QK_K // 16),
                       ("d", "<f2")])


def _f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:  # [..., n] uint8 -> [..., 2n] uint8
    """The low 4 bits of every byte, then the high 4 bits of every byte (ggml's order within a
    block: value j in the low nibble of byte j, value j + n in its high nibble)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray, n: int) -> np.ndarray:  # [...] uint32 -> [..., n] uint8
    """Bit j of a 32-bit word as value j's fifth bit (Q5_0, Q5_1: bit j belongs to value j)."""
    return ((qh[..., None] >> np.arange(n, dtype=np.uint32)) & 1).astype(np.uint8)


# --- the 32-blocks --------------------------------------------------------------------------------

def dequantize_q8_0(b: np.ndarray) -> np.ndarray:
    """y = qs · d, qs int8. (dequantize_row_q8_0)"""
    return (_f32(b["qs"]) * _f32(b["d"])[..., None]).reshape(*b.shape[:-1], -1)


def dequantize_q4_0(b: np.ndarray) -> np.ndarray:
    """y = d · (q - 8), q the 4-bit nibbles. (dequantize_row_q4_0)"""
    q = _nibbles(b["qs"]).astype(np.int8) - np.int8(8)
    return (_f32(b["d"])[..., None] * _f32(q)).reshape(*b.shape[:-1], -1)


def dequantize_q4_1(b: np.ndarray) -> np.ndarray:
    """y = d · q + m, q the 4-bit nibbles. (dequantize_row_q4_1)"""
    q = _f32(_nibbles(b["qs"]))
    return (_f32(b["d"])[..., None] * q + _f32(b["m"])[..., None]).reshape(*b.shape[:-1], -1)


def _q5(b: np.ndarray) -> np.ndarray:  # -> [..., 32] uint8 in 0..31
    """The 5-bit quants of Q5_0 / Q5_1: a nibble from qs, the fifth bit from qh."""
    return _nibbles(b["qs"]) | (_high_bits(b["qh"], QK) << 4)


def dequantize_q5_0(b: np.ndarray) -> np.ndarray:
    """y = d · (q - 16), q 5 bits. (dequantize_row_q5_0)"""
    q = _q5(b).astype(np.int8) - np.int8(16)
    return (_f32(b["d"])[..., None] * _f32(q)).reshape(*b.shape[:-1], -1)


def dequantize_q5_1(b: np.ndarray) -> np.ndarray:
    """y = d · q + m, q 5 bits. (dequantize_row_q5_1)"""
    return (_f32(b["d"])[..., None] * _f32(_q5(b)) + _f32(b["m"])[..., None]).reshape(*b.shape[:-1], -1)


# --- the K-quants: super-blocks of 256 values in sub-blocks with their own scales -----------------

def scales_and_mins_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # [..., 12] -> 2 × [..., 8]
    """The eight 6-bit scales and eight 6-bit mins of a Q4_K / Q5_K super-block (get_scale_min_k4):
    sub-blocks 0-3 take the low 6 bits of bytes 0-3 (scale) and 4-7 (min); sub-blocks 4-7 take a
    nibble of bytes 8-11 (low: scale, high: min) and, as their two high bits, the top two bits of
    bytes 0-3 (scale) and 4-7 (min)."""
    lo, hi, mixed = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([lo & 63, (mixed & 0x0F) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([hi & 63, (mixed >> 4) | ((hi >> 6) << 4)], axis=-1)
    return sc, mn


def _k4_nibbles(qs: np.ndarray) -> np.ndarray:  # [..., 128] -> [..., 8, 32]
    """Q4_K / Q5_K: 32 bytes serve two sub-blocks, 2k in the low nibbles and 2k + 1 in the high."""
    pairs = qs.reshape(*qs.shape[:-1], 4, 1, 32)
    return np.concatenate([pairs & 0x0F, pairs >> 4], axis=-2).reshape(*qs.shape[:-1], 8, 32)


def _k_affine(b: np.ndarray, q: np.ndarray) -> np.ndarray:  # q [..., 8, 32] -> [..., 256]
    """y = (d · scale) · q - (dmin · min), per sub-block of 32."""
    sc, mn = scales_and_mins_k4(b["scales"])
    d = _f32(b["d"])[..., None] * _f32(sc)  # [..., 8]
    m = _f32(b["dmin"])[..., None] * _f32(mn)
    return (d[..., None] * _f32(q) - m[..., None]).reshape(*b.shape[:-1], -1)


def dequantize_q4_k(b: np.ndarray) -> np.ndarray:
    """y = (d · sc) · q - (dmin · m), q 4 bits, sc and m 6 bits per sub-block of 32.
    (dequantize_row_q4_K)"""
    return _k_affine(b, _k4_nibbles(b["qs"]))


def dequantize_q5_k(b: np.ndarray) -> np.ndarray:
    """As Q4_K with 5-bit q: the fifth bit of value l of sub-block j is bit j of qh[l].
    (dequantize_row_q5_K)"""
    high = (b["qh"][..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # [..., 8, 32]
    return _k_affine(b, _k4_nibbles(b["qs"]) | (high << 4))


def dequantize_q6_k(b: np.ndarray) -> np.ndarray:
    """y = (d · scale) · (q - 32), q 6 bits, scale int8 per sub-block of 16. (dequantize_row_q6_K)

    Each half of 128 values takes 64 bytes of ql and 32 of qh: its four runs of 32 values are the
    low nibbles of ql[0:32], of ql[32:64], then the high nibbles of ql[0:32], of ql[32:64], each
    with two high bits from qh[0:32] at bits 0-1, 2-3, 4-5, 6-7."""
    ql = b["ql"].reshape(*b.shape, 2, 1, 64)  # [..., half, 1, 64]
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=-2).reshape(*b.shape, 2, 4, 32)
    qh = b["qh"].reshape(*b.shape, 2, 1, 32)
    high = (qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3  # [..., half, 4, 32]
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)  # [..., half, run, 32]
    d = _f32(b["d"])[..., None] * _f32(b["scales"])  # [..., 16]
    return (d.reshape(*b.shape, 16, 1) * _f32(q).reshape(*b.shape, 16, 16)).reshape(*b.shape[:-1], -1)


# --- the float types --------------------------------------------------------------------------------

def dequantize_f32(b: np.ndarray) -> np.ndarray:
    return b


def dequantize_f16(b: np.ndarray) -> np.ndarray:
    """IEEE half to float32, exact. (ggml_fp16_to_fp32)"""
    return _f32(b)


def dequantize_bf16(b: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: shift its 16 bits up, exact. (ggml_bf16_to_fp32)"""
    return (b.astype(np.uint32) << 16).view(np.float32)


# --- the table ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GGMLType:
    """One ggml storage type: its id in a GGUF tensor header, its name, the values per block, the
    block's layout and the dequantizer. ggml.c's type_traits give block_size and type_size."""

    id: int
    name: str
    block: np.dtype
    block_size: int
    dequantize: Callable[[np.ndarray], np.ndarray]

    @property
    def type_size(self) -> int:  # bytes per block
        return self.block.itemsize

    def row_bytes(self, n: int) -> int:
        return n // self.block_size * self.type_size


SUPPORTED = {t.id: t for t in (
    GGMLType(0, "F32", np.dtype("<f4"), 1, dequantize_f32),
    GGMLType(1, "F16", np.dtype("<f2"), 1, dequantize_f16),
    GGMLType(2, "Q4_0", BLOCK_Q4_0, QK, dequantize_q4_0),
    GGMLType(3, "Q4_1", BLOCK_Q4_1, QK, dequantize_q4_1),
    GGMLType(6, "Q5_0", BLOCK_Q5_0, QK, dequantize_q5_0),
    GGMLType(7, "Q5_1", BLOCK_Q5_1, QK, dequantize_q5_1),
    GGMLType(8, "Q8_0", BLOCK_Q8_0, QK, dequantize_q8_0),
    GGMLType(12, "Q4_K", BLOCK_Q4_K, QK_K, dequantize_q4_k),
    GGMLType(13, "Q5_K", BLOCK_Q5_K, QK_K, dequantize_q5_k),
    GGMLType(14, "Q6_K", BLOCK_Q6_K, QK_K, dequantize_q6_k),
    GGMLType(30, "BF16", np.dtype("<u2"), 1, dequantize_bf16),
)}

# Every other type id ggml defines (ggml.h, enum ggml_type), to name an unsupported one.
OTHER_TYPE_NAMES = {
    4: "Q4_2 (removed)", 5: "Q4_3 (removed)", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8",
    25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 31: "Q4_0_4_4 (removed)", 32: "Q4_0_4_8 (removed)",
    33: "Q4_0_8_8 (removed)", 34: "TQ1_0", 35: "TQ2_0", 36: "IQ4_NL_4_4 (removed)", 37: "IQ4_NL_4_8 (removed)",
    38: "IQ4_NL_8_8 (removed)", 39: "MXFP4",
}


def type_name(type_id: int) -> str:
    t = SUPPORTED.get(type_id)
    return t.name if t is not None else OTHER_TYPE_NAMES.get(type_id, f"unknown type {type_id}")


def supported_names() -> str:
    return ", ".join(t.name for t in SUPPORTED.values())


def dequantize_rows(raw: np.ndarray, ggml_type: GGMLType, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Rows of a stored tensor, [rows, row_bytes] uint8, as float32 [rows, n] (n values per row),
    written into `out` when given (a float32 array of that shape)."""
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).view(ggml_type.block)  # [rows, n_blocks]
    values = ggml_type.dequantize(blocks).reshape(rows, -1)
    if out is None:
        return values if values.dtype == np.float32 else values.astype(np.float32)
    np.copyto(out, values)
    return out


class QuantizedWeight:
    """A matrix [n_out, n_in] kept in ggml blocks, as a GGUF file stores it: n_out rows of
    n_in / block_size blocks (`raw`, uint8 [n_out, row_bytes], memory-mapped from the file).

    What the model does with a weight, it does here on exact values: `w[ids]` gives float32 rows
    (the embedding lookup), and `llama3_np.products.linear` dequantizes a block of rows at a time
    into its per-thread float32 buffer (`rows_into`)."""

    ndim = 2

    def __init__(self, raw: np.ndarray, ggml_type: GGMLType, shape: tuple[int, int]):
        if raw.shape != (shape[0], ggml_type.row_bytes(shape[1])):
            raise ValueError(f"{ggml_type.name} rows {raw.shape} do not hold a {shape} matrix")
        self.raw, self.type, self.shape = raw, ggml_type, tuple(shape)

    @property
    def dtype(self) -> str:  # the storage, named as ggml names it
        return self.type.name

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes

    @property
    def itemsize(self) -> float:  # bytes per value, averaged over a block (Q4_1: 20 / 32 = 0.625)
        return self.type.type_size / self.type.block_size

    def rows_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Rows start..stop as float32, written into `out` ([stop - start, n_in] float32): the
        hook by which `products` converts a weight of its own kind (`products.rows_into`)."""
        dequantize_rows(self.raw[start:stop], self.type, out=out)

    def __getitem__(self, ids) -> np.ndarray:  # [T] ints -> [T, n_in] float32
        return dequantize_rows(self.raw[np.asarray(ids)], self.type)

    def __repr__(self):
        return f"QuantizedWeight({self.type.name}, shape={self.shape})"
