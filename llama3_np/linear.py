"""The matrix product of the model, `linear`, and how it uses weights kept in low precision.

`llama3_np.model` calls `linear(x, w)` for every weight product and nothing else; whether `w` is
float32 or bfloat16 is decided here, outside the specification. Compute is always float32.
"""

from __future__ import annotations

import numpy as np

# A bfloat16 (or float16) weight matrix is converted to float32 this many bytes at a time: a block
# that is multiplied while it is still in the CPU cache, so that a model kept in bfloat16 never
# holds, nor allocates on every token, a float32 copy of a whole matrix.
CONVERT_BLOCK_BYTES = 1 << 20


def as_float32(w: np.ndarray) -> np.ndarray:
    """A weight as float32: the array itself when it already is, else a converted copy."""
    return np.asarray(w, dtype=np.float32)


def conversion_rows(n_out: int, n_in: int) -> int:
    """How many rows of an [n_out, n_in] low-precision matrix `linear` converts at a time."""
    return min(n_out, max(1, CONVERT_BLOCK_BYTES // (4 * n_in)))


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:  # [T, n_in], [n_out, n_in] -> [T, n_out]
    """x · wᵀ: the product with a weight stored as [n_out, n_in] (the layout of Meta's checkpoints).

    x is float32; w is float32, or bfloat16/float16, converted exactly to float32 a block of
    `conversion_rows` rows at a time. The result is float32 [T, n_out] either way."""
    if w.dtype == np.float32:
        return x @ w.T
    n_out, n_in = w.shape
    rows = conversion_rows(n_out, n_in)
    block = np.empty((rows, n_in), dtype=np.float32)
    out = np.empty((x.shape[0], n_out), dtype=np.float32)
    for start in range(0, n_out, rows):
        w_rows = block[:min(rows, n_out - start)]
        np.copyto(w_rows, w[start:start + rows])
        out[:, start:start + rows] = x @ w_rows.T
    return out
