"""Checks at the specification's boundary: arguments a caller can get wrong, refused with a message
that says what is wrong, before any computation starts. `llama3_np.model` calls these and keeps
only the math.
"""

from __future__ import annotations

import numpy as np

from .config import ComputeMode
from .errors import Llama3Error, ParameterError
from .stages import Keep


def expect_shape(x: np.ndarray, shape: tuple, name: str) -> np.ndarray:
    """`x` itself, after checking its shape (this is what keeps the shape comments honest).

    Raises ValueError on a mismatch: a wrong shape inside the model is a bug, not a user's mistake."""
    if x.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {x.shape}")
    return x


def token_ids(tokens, vocab_size: int) -> np.ndarray:  # -> [T] int64
    """`tokens` as a 1-D int64 array of ids, each checked to be in 0 .. vocab_size-1.

    Raises Llama3Error naming the first id outside the vocabulary. Every path that takes token ids
    from a user (the command line's --tokens, a dump's metadata, `forward`) checks them here."""
    try:
        ids = np.asarray(tokens, dtype=np.int64)
    except OverflowError:  # an id beyond int64's range, so outside the vocabulary too
        ids = None
    if ids is not None and ids.ndim != 1:
        raise Llama3Error(f"token ids must be a 1-D list, got shape {ids.shape}")
    bad = [int(t) for t in tokens if not 0 <= t < vocab_size] if ids is None else ids[(ids < 0) | (ids >= vocab_size)]
    if len(bad):
        raise Llama3Error(f"token id {int(bad[0])} is outside the vocabulary (0..{vocab_size - 1})")
    return ids


def check_parallel(parallel) -> int:
    """`parallel`, how many inputs go through the model together (llama.cpp's -np), checked.

    Raises ParameterError("parallel") when it is not an integer >= 1."""
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ParameterError("parallel", f"parallel must be an integer >= 1, got {parallel!r}")
    return parallel


def forward_arguments(tokens, vocab_size: int, cache_length: int, cache_max_len: int,
                      pos: int) -> np.ndarray:  # -> [T] int64
    """The arguments of one `forward` call, checked: non-empty valid token ids that fit in the KV
    cache, and a position >= 0. Returns the ids as an int64 array."""
    ids = token_ids(tokens, vocab_size)
    if ids.size == 0:
        raise Llama3Error("forward needs a non-empty 1-D list of token ids, got shape (0,)")
    if cache_length + ids.size > cache_max_len:
        raise Llama3Error(f"the KV cache holds {cache_length} of {cache_max_len} tokens; "
                          f"{ids.size} more do not fit (use a larger context)")
    if pos < 0:
        raise Llama3Error(f"position must be >= 0, got {pos}")
    return ids


def forward_mode(compute, cache_mode):
    """The compute mode of a `forward` call: `compute` (a name or a ComputeMode), or the cache's
    when None. Raises ParameterError("compute") for an unknown mode, or one the cache (which holds
    keys and values in its own mode's dtype) was not made for."""
    if compute is None:
        return cache_mode
    mode = ComputeMode.of(compute)
    if mode != cache_mode:
        raise ParameterError("compute", f"compute {mode.name!r} needs a KV cache made for it: KVCache(config, "
                                        f"max_len, compute={mode.dtype!r}), not one made for {cache_mode.name!r}")
    return mode


def finite_stages(keep: Keep, prefix: str, mode: ComputeMode) -> Keep:
    """`keep`, refusing a stage with an infinite (or NaN) value when the mode can overflow.

    float16's largest value is 65504: a model whose activations exceed it (massive activations in
    the residual stream are common) gives inf at the stage that rounds them, then NaN. Such a run
    is stopped at the first stage that shows it, named, instead of returning NaN logits.
    Raises ParameterError("compute")."""
    if mode.dtype != "float16":
        return keep

    def checked(name: str, x: np.ndarray) -> np.ndarray:
        if not np.isfinite(x).all():
            big = np.abs(x[np.isfinite(x)]).max(initial=0)
            raise ParameterError("compute", f"float16 overflows at stage {prefix}{name}: it holds values beyond "
                                            f"±65504, float16's largest (largest finite {big:.4g}); compute in "
                                            "bfloat16 or float32")
        return keep(name, x)
    return checked


def batch_arguments(batch, caches, positions, compute, vocab_size: int):
    """The arguments of one `forward_batch` call, checked: at least one sequence, a cache and a
    position per sequence, caches of one compute mode, and each sequence's `forward_arguments`.
    Returns the mode and the sequences' ids (int64 arrays). Raises Llama3Error naming the sequence
    (counted from 0) whose tokens, cache or position are wrong; ParameterError("compute") as
    `forward_mode`, and for caches of different modes."""
    if len(batch) == 0:
        raise Llama3Error("a batch needs at least one sequence")
    if len(caches) != len(batch) or len(positions) != len(batch):
        raise Llama3Error(f"a batch of {len(batch)} sequences needs one KV cache and one position each, got "
                          f"{len(caches)} caches and {len(positions)} positions")
    mode = forward_mode(compute, caches[0].mode)
    ids = []
    for b, (tokens, cache, pos) in enumerate(zip(batch, caches, positions)):
        if cache.mode != mode:
            raise ParameterError("compute", f"every sequence of a batch computes in one mode: sequence {b}'s "
                                            f"KV cache was made for {cache.mode.name!r}, not {mode.name!r}")
        try:
            ids.append(forward_arguments(tokens, vocab_size, cache.length, cache.max_len, pos))
        except Llama3Error as e:
            raise Llama3Error(f"sequence {b} of the batch: {e}") from None
    return mode, ids
