"""The matrix product of the model, `linear`, and how it uses weights kept in low precision.

`llama3_np.model` calls `linear(x, w)` for every weight product and nothing else; whether `w` is
float32 or bfloat16 is decided here, outside the specification, and how the product runs fast (in
blocks of rows, bfloat16 converted block by block, on llama3_np's own threads) in
`llama3_np.products`. Compute is float32, or float64 for a float64 `x` (float64 mode).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from . import products
from .config import ComputeMode
from .llamacpp import LlamaCppWeight, product
from .lora import LoraWeight


def as_float32(w: np.ndarray) -> np.ndarray:
    """A weight as float32: the array itself when it already is, else a converted copy."""
    return np.asarray(w, dtype=np.float32)


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:  # [T, n_in], [n_out, n_in] -> [T, n_out]
    """x · wᵀ: the product with a weight stored as [n_out, n_in] (the layout of Meta's checkpoints).

    x is float32; w is float32, or bfloat16/float16, converted exactly to float32 a block of rows at
    a time (`products.linear`). The result is float32 [T, n_out] either way, equal to float32
    `x @ w.T` up to the order of each dot product's sum. A float64 x (float64 mode) is multiplied
    in float64 by w upcast exactly (a copy unless w is float64 already), with NumPy's own product:
    float64 is the mode of the exact value, not of speed. A weight with an unmerged LoRA adapter
    (`lora.LoraWeight`) adds s·B·(A·x) to the base weight's product."""
    if isinstance(w, LlamaCppWeight):  # llama.cpp's product: the activations quantized first
        return product(x, w)
    if isinstance(w, LoraWeight):
        return linear(x, w.base) + linear(linear(x, w.a), w.b) * x.dtype.type(w.scale)
    if x.dtype == np.float64:
        return x @ np.asarray(w, dtype=np.float64).T
    return products.linear(x, w)


def mode_weights(weights: Mapping[str, np.ndarray], mode: ComputeMode) -> dict[str, np.ndarray]:
    """The weights as `mode` computes with them, converted once (`forward` would otherwise convert
    them in every call): upcast to float64 in float64 mode, rounded to bfloat16/float16 (round to
    nearest even) in those modes unless already stored so, each matrix wrapped as llama.cpp
    multiplies it in llamacpp (`llamacpp.llamacpp_weight`, which keeps what it converts once),
    unchanged in float32. Arrays shared between names (tied embeddings) stay shared."""
    if mode.dtype == "float32":
        return dict(weights)
    converted: dict[int, np.ndarray] = {}

    def convert(name: str, w: np.ndarray) -> np.ndarray:
        if id(w) not in converted:
            converted[id(w)] = np.asarray(w, dtype=np.float64) if mode.dtype == "float64" else mode.weight(w, name)
        return converted[id(w)]

    return {name: convert(name, w) for name, w in weights.items()}
