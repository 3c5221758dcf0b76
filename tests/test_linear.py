"""`linear`: a bfloat16 matrix converted block by block gives the product of its float32 copy,
whatever the block size (the blocks and threads themselves: tests/test_products.py)."""

import ml_dtypes
import numpy as np
import pytest

from llama3_np import linear, products
from tests.helpers import assert_close


@pytest.mark.parametrize("block_bytes", [1, 4 * 48, 4 * 48 * 7, 1 << 20])
@pytest.mark.parametrize("T", [1, 5])
def test_linear_converts_bfloat16_by_blocks_to_the_float32_product(monkeypatch, block_bytes, T):
    monkeypatch.setattr(products, "CONVERT_BLOCK_BYTES", block_bytes)  # 1 row, 1 row, 7 rows, all 61
    rng = np.random.default_rng(0)
    w = rng.normal(size=(61, 48)).astype(ml_dtypes.bfloat16)
    x = rng.normal(size=(T, 48)).astype(np.float32)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    got = linear.linear(x, w)
    assert got.dtype == np.float32 and got.shape == (T, 61)
    assert_close(got, ref, f"bf16 linear, {block_bytes}-byte blocks", 1e-13)
    assert_close(linear.linear(x, w.astype(np.float32)), ref, "float32 linear", 1e-13)
