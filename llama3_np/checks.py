"""Checks at the specification's boundary: arguments a caller can get wrong, refused with a message
that says what is wrong, before any computation starts. `llama3_np.model` calls these and keeps
only the math.
"""

from __future__ import annotations

import numpy as np

from .config import ComputeMode
from .errors import Llama3Error


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
    ids = np.asarray(tokens, dtype=np.int64)
    if ids.ndim != 1:
        raise Llama3Error(f"token ids must be a 1-D list, got shape {ids.shape}")
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise Llama3Error(f"token id {int(bad[0])} is outside the vocabulary (0..{vocab_size - 1})")
    return ids


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
    when None. Raises Llama3Error for an unknown mode, or one the cache (which holds
    keys and values in its own mode's dtype) was not made for."""
    if compute is None:
        return cache_mode
    mode = ComputeMode.of(compute)
    if mode != cache_mode:
        raise Llama3Error(f"compute {mode.dtype!r} needs a KV cache made for it: KVCache(config, "
                          f"max_len, compute={mode.dtype!r}), not one made for {cache_mode.dtype!r}")
    return mode
