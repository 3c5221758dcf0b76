"""The matrix product of the model, `linear`, and how it uses weights kept in low precision.

`llama3_np.model` calls `linear(x, w)` for every weight product, and `linears(x, w1, w2, ...)` for
the weights that multiply one input; whether `w` is float32 or bfloat16, and whether several
weights run as one product (`fuse_projections`), is decided here, outside the specification, and
how the product runs fast (in blocks of rows, bfloat16 converted block by block, on llama3_np's own
threads) in `llama3_np.products`. Compute is float32, or float64 for a float64 `x` (float64 mode).
"""

from __future__ import annotations

import weakref
from typing import Mapping, MutableMapping, Optional, Sequence

import numpy as np

from . import products
from .config import ComputeMode
from .formats.canonical import joined_names, row_blocks
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
    if isinstance(w, LoraWeight):
        return linear(x, w.base) + linear(linear(x, w.a), w.b) * x.dtype.type(w.scale)
    if x.dtype == np.float64:  # the exact value, whatever the weight is held as for other modes
        return x @ exact_float64(w.base if isinstance(w, LlamaCppWeight) else w).T
    if isinstance(w, LlamaCppWeight):  # llama.cpp's product: the activations quantized first
        return product(x, w)
    return products.linear(x, w)


def exact_float64(w) -> np.ndarray:  # [n_out, n_in] -> [n_out, n_in] float64
    """A weight's values in float64, exactly (float64 holds every value of every stored type): an
    array upcast (itself when it is float64), a weight of its own kind (ggml blocks) through the
    float32 rows its `rows_into` writes (`products.rows_into`)."""
    if isinstance(w, np.ndarray):
        return np.asarray(w, dtype=np.float64)
    rows = np.empty(w.shape, dtype=np.float32)
    products.rows_into(w)(0, w.shape[0], rows)
    return rows.astype(np.float64)


def linears(x: np.ndarray, *ws) -> tuple[np.ndarray, ...]:
    # [T, n_in], k x [n_i, n_in] -> k x [T, n_i]
    """`linear(x, w)` for each of several weights that multiply the same input (q, k and v; the gate
    and the up projection): in a decode step (one row of x), one product when they are consecutive
    row blocks of one array (as `fuse_projections` holds them), each weight's columns of it a view;
    separate products otherwise (several rows; LoRA and llama.cpp weights, quantized blocks,
    separate arrays). Either way each value is the dot product of a row of x with a row of a
    weight, in float32 (`linear`). Several rows stay separate because the matrix-matrix kernel's
    sums depend on the number of columns, so one product would change a prefill's last bits, and it
    measured no faster (BENCHMARKS.md, "Threads and blocks"); the matrix-vector kernel sums each row
    by itself (docs/DESIGN.md, "Fused products")."""
    whole, bounds = joined(ws) if x.shape[0] == 1 else (None, [])
    if whole is None:
        return tuple(linear(x, w) for w in ws)
    y = linear(x, whole)  # [T, sum n_i]
    return tuple(y[:, start:stop] for start, stop in bounds)


# `joined`'s answers, by the ids of the weights asked about: (weak references to the weights, to the
# array they are rows of or None, and each one's columns of its product), so that a decode step does
# not inspect the same arrays again (some 15 µs a group); the weak references make an entry stand
# for the very arrays it was made of, and keep nothing alive.
_joined: dict[tuple[int, ...], tuple] = {}


def joined(ws: Sequence) -> tuple[Optional[np.ndarray], list[tuple[int, int]]]:
    """(the array whose rows are exactly `ws`' rows one after the other, each w a view of it, and
    the rows of each w in it), or (None, []) when there is none."""
    key = tuple(map(id, ws))
    hit = _joined.get(key)
    if hit is not None and all(ref() is w for ref, w in zip(hit[0], ws)):
        return hit[1](), hit[2]
    whole, bounds = _rows_of_one_array(ws)
    try:
        refs = [weakref.ref(w) for w in ws]
    except TypeError:  # a weight of a kind that takes no weak reference: asked again each time
        return whole, bounds
    if len(_joined) >= 1 << 12:  # only arrays freed since leave entries behind
        _joined.clear()
    _joined[key] = (refs, (lambda: None) if whole is None else weakref.ref(whole), bounds)
    return whole, bounds


def _rows_of_one_array(ws: Sequence) -> tuple[Optional[np.ndarray], list[tuple[int, int]]]:
    base = ws[0].base if isinstance(ws[0], np.ndarray) else None
    if type(base) is not np.ndarray or base.ndim != 2 or not base.flags.c_contiguous:
        return None, []
    origin = start = base.__array_interface__["data"][0]
    bounds = []
    for w in ws:
        if not (isinstance(w, np.ndarray) and w.base is base and w.ndim == 2 and w.flags.c_contiguous
                and w.shape[1] == base.shape[1] and w.__array_interface__["data"][0] == start):
            return None, []
        row = (start - origin) // base.strides[0]
        bounds.append((row, row + w.shape[0]))
        start += w.nbytes
    return (base, bounds) if start == origin + base.nbytes else (None, [])


def fuse_projections(weights: MutableMapping[str, np.ndarray], n_layers: int) -> None:
    """Hold each layer's weights that multiply one input (`formats.canonical.JOINED`) as consecutive
    row blocks of one array, in place, unless they are already: the names keep Meta's separate
    matrices (views of the joined array), and `linears` multiplies them in one product. A layer at a
    time, so that memory grows by one group at most while the separate arrays are released (unless
    the caller holds them). Groups that are not NumPy arrays of one dtype and width, and memory-mapped
    ones (read-only arrays over a file's bytes, which a copy would make resident), stay as they are."""
    for names in joined_names(n_layers):
        ws = [weights[name] for name in names]
        if joined(ws)[0] is not None or not all(
                type(w) is np.ndarray and w.ndim == 2 and w.dtype == ws[0].dtype and w.shape[1] == ws[0].shape[1]
                and (w.flags.owndata or w.flags.writeable) for w in ws):
            continue
        whole = np.concatenate(ws)
        counts = [w.shape[0] for w in ws]
        del ws
        weights.update(zip(names, row_blocks(whole, counts)))


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
            converted[id(w)] = exact_float64(w) if mode.dtype == "float64" else mode.weight(w, name)
        return converted[id(w)]

    return {name: convert(name, w) for name, w in weights.items()}
