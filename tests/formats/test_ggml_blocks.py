"""llama3_np.formats.ggml_blocks: every supported type's dequantizer is bit-equal to the gguf
package's NumPy reference (`gguf.quants.dequantize`), on random blocks whose scales take both signs
(and zero, subnormal, the largest half values, infinities and NaNs), row by row. (ggml never cuts
a block across rows, so there is no partial block to test: a row length that is not a whole
number of blocks is refused when a file is read, tests/formats/test_gguf_file.py.)"""

from pathlib import Path

import gguf
import numpy as np
import pytest

from llama3_np.formats import ggml_blocks
from llama3_np.formats.ggml_blocks import QK_K, SUPPORTED

ROWS, BLOCKS_PER_ROW = 7, 3

# Half-precision scales of both signs: ±0, the smallest subnormal, ordinary values, the largest finite.
SPECIAL_HALVES = np.array([0.0, -0.0, 6e-8, -6e-8, 1.0, -1.0, 0.01, -0.01, 65504.0, -65504.0], np.float16)


def random_blocks(t, rng) -> np.ndarray:  # -> [ROWS, BLOCKS_PER_ROW * type_size] uint8
    """Random bytes (so every half-precision field, d, m or dmin, takes random values of both signs,
    infinities and NaNs included), then a tenth of those fields set to the special values above."""
    raw = rng.integers(0, 256, (ROWS, BLOCKS_PER_ROW * t.type_size), dtype=np.uint8)
    blocks = raw.view(t.block)
    for name in (t.block.names or ()):
        if t.block[name] == np.dtype("<f2"):
            special = rng.random(blocks.shape) < 0.1
            blocks[name][special] = rng.choice(SPECIAL_HALVES, special.sum())
    return raw


def same_bits(a, b) -> bool:
    return a.shape == b.shape and np.array_equal(np.asarray(a, np.float32).view(np.uint32),
                                                 np.asarray(b, np.float32).view(np.uint32))


@pytest.mark.parametrize("t", SUPPORTED.values(), ids=lambda t: t.name)
@np.errstate(invalid="ignore", over="ignore")  # inf · 0 and overflows are part of what is compared
def test_dequantizer_is_bit_equal_to_gguf_on_random_blocks(t):
    rng = np.random.default_rng(t.id)
    for _ in range(20):
        raw = random_blocks(t, rng)
        ours = ggml_blocks.dequantize_rows(raw, t)
        reference = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(t.id))
        assert ours.shape == (ROWS, BLOCKS_PER_ROW * t.block_size) and ours.dtype == np.float32
        differ = ours.view(np.uint32) != np.asarray(reference, np.float32).view(np.uint32)
        assert not differ.any(), f"{t.name}: {differ.sum()} values differ, first at {np.argwhere(differ)[0]}"


REAL = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints" / "gguf_default_model_types.gguf"


@pytest.mark.parametrize("rows_per_step", [3, 8])
def test_every_type_is_bit_equal_to_gguf_on_the_default_models_tensors_as_llama_cpp_quantizes_them(
        rows_per_step, monkeypatch):
    """Rows of the default model's tensors requantized by llama.cpp's own `llama-quantize` into each
    type (tools/make_gguf_type_fixture.py): real scales and quants, not only random bytes; read a
    few rows at a time as a GGUF tensor is (8 rows by 3: the last step holds 2)."""
    from llama3_np.formats import gguf_file

    tensors = gguf_file.GGUFFile(REAL).tensors
    assert sorted(t.type.name for t in tensors.values()) == sorted(t.name for t in SUPPORTED.values())
    for name, t in tensors.items():
        assert name.startswith(f"{t.type.name}:") and t.shape[0] == 8, name
        monkeypatch.setattr(gguf_file, "VALUES_PER_STEP", rows_per_step * t.shape[-1])
        reference = gguf.quants.dequantize(t.raw(), gguf.GGMLQuantizationType(t.type.id))
        ours = t.values()
        assert ours.shape == t.shape and np.isfinite(ours).all() and same_bits(ours, reference), name


@pytest.mark.parametrize("t", SUPPORTED.values(), ids=lambda t: t.name)
def test_table_agrees_with_ggml_sizes(t):
    """Block size and bytes per block as ggml's type_traits (through the gguf package) give them."""
    assert (t.block_size, t.type_size) == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.id)]
    assert t.name == gguf.GGMLQuantizationType(t.id).name


def test_scale_signs_reach_the_values():
    """A negative d flips a Q8_0 block, a negative m moves a Q4_1 block down: the fields are read
    where ggml puts them (a misplaced field would still pass a test on zeros)."""
    q8 = np.zeros(1, ggml_blocks.BLOCK_Q8_0)
    q8["d"], q8["qs"] = -0.5, np.arange(-16, 16)
    np.testing.assert_array_equal(ggml_blocks.dequantize_q8_0(q8), -0.5 * np.arange(-16, 16))
    q41 = np.zeros(1, ggml_blocks.BLOCK_Q4_1)
    q41["d"], q41["m"], q41["qs"] = 1.0, -3.0, 0x21  # low nibbles 1 (values 0-15), high 2 (16-31)
    np.testing.assert_array_equal(ggml_blocks.dequantize_q4_1(q41), np.repeat([-2.0, -1.0], 16))


def test_dequantize_rows_writes_into_a_buffer():
    t = SUPPORTED[12]  # Q4_K
    raw = random_blocks(t, np.random.default_rng(5))
    out = np.full((ROWS, BLOCKS_PER_ROW * t.block_size), np.nan, np.float32)
    assert ggml_blocks.dequantize_rows(raw, t, out=out) is out
    assert same_bits(out, gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K))


@pytest.mark.parametrize("t", [t for t in SUPPORTED.values() if t.block_size > 1], ids=lambda t: t.name)
@pytest.mark.parametrize("tokens", [1, 5])
def test_products_with_a_quantized_weight_equal_the_dequantized_matrix(t, tokens):
    """`--dtype gguf`: products.linear dequantizes blocks of rows of a QuantizedWeight into its
    float32 buffer, on two threads: the values are the exact ones, so the result equals the product
    with the dequantized matrix up to the order of each sum; the embedding lookup is exact."""
    from llama3_np import products

    rng = np.random.default_rng(7)
    n_out, n_in = 600, 8 * QK_K  # with 5 tokens, large enough to be split between the threads
    raw = rng.integers(0, 256, (n_out, t.row_bytes(n_in)), dtype=np.uint8)
    for name in (t.block.names or ()):  # finite, modest scales, so that the sums are well conditioned
        if t.block[name] == np.dtype("<f2"):
            raw.view(t.block)[name] = rng.uniform(-0.01, 0.01, raw.view(t.block).shape)
    w = ggml_blocks.QuantizedWeight(raw, t, (n_out, n_in))
    dense = ggml_blocks.dequantize_rows(raw, t)
    x = rng.standard_normal((tokens, n_in)).astype(np.float32)
    before = products.get_threads()
    products.set_threads(2)
    try:
        got = products.linear(x, w)
    finally:
        products.set_threads(before)
    want = x.astype(np.float64) @ dense.T.astype(np.float64)
    nmse = float(np.mean((got - want) ** 2) / np.mean(want ** 2))
    assert got.shape == (tokens, n_out) and got.dtype == np.float32 and nmse < 1e-12, nmse
    ids = np.array([3, 0, 599, 3])
    assert same_bits(w[ids], dense[ids])
