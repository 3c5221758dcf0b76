"""bfloat16 as a NumPy dtype: ml_dtypes' `bfloat16`, imported only when a bfloat16 array is made.

NumPy has no bfloat16; `ml_dtypes` registers one. Importing ml_dtypes 0.7.0 takes 1.6 to 1.9 s (its
extension registers a dozen types), which a command that never touches a bfloat16 tensor
(`llama3-np --version`, `--help`, `tokenize`) should not pay: every module of llama3_np that needs
the dtype asks `bfloat16()` where it makes or names a bfloat16 array, and `is_bfloat16` tells one
apart without the import (an array of that dtype exists only once ml_dtypes is imported).
"""

from __future__ import annotations

import functools

import numpy as np


@functools.cache
def bfloat16() -> np.dtype:
    """ml_dtypes' bfloat16 dtype (1 sign, 8 exponent, 7 mantissa bits: the high half of a float32)."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def is_bfloat16(dtype) -> bool:
    """Whether `dtype` (a np.dtype) is bfloat16, without importing ml_dtypes."""
    return dtype.name == "bfloat16"
