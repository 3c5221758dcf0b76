"""`linear`: a bfloat16 matrix converted block by block gives the product of its float32 copy,
whatever the block size (the blocks and threads themselves: tests/test_products.py)."""

import ml_dtypes
import numpy as np
import pytest

from llama3_np import linear, products
from llama3_np.config import ComputeMode
from llama3_np.assets import default_model
from llama3_np.formats.canonical import JOINED, joined_names
from llama3_np.formats.checkpoint import load_checkpoint
from llama3_np.linear import mode_weights
from llama3_np.load import load_model
from llama3_np.lora import LoraWeight
from llama3_np.model import KVCache, forward
from tests.helpers import assert_close, nmse, random_weights, tiny_config

# Logits of a model whose q/k/v and gate/up products run fused against separate ones, by compute mode.
# Measured 0 in both (the same bits: docs/DESIGN.md, "Fused products"); what any CPU's kernels allow:
# in float32, products within the dot-product bound of each other, some 1e-7 relative, so far below
# 1e-12; in bfloat16 a sum in another order may round to the neighbouring bfloat16, which later
# roundings carry on (NMSE up to ~1e-4 at the default model's logits: docs/DESIGN.md, "Numerical facts").
FUSED_NMSE = {"float32": 1e-12, "bfloat16": 1e-4}


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


# --- fused products: one product for the weights that multiply one input -----------------------

U = 2.0 ** -24



def within_dot_bound(got, x, w, name):
    """|got - x·wᵀ| <= γ_n·|x|·|w|ᵀ elementwise, γ_n = n·u/(1 - n·u): the bound of any float32 sum of n
    products in any order (Higham, Accuracy and Stability of Numerical Algorithms, eq. 3.5), so it
    holds for every kernel and CPU."""
    n = x.shape[1]
    exact = x.astype(np.float64) @ np.asarray(w, dtype=np.float64).T
    bound = n * U / (1 - n * U) * (np.abs(x.astype(np.float64)) @ np.abs(np.asarray(w, dtype=np.float64)).T)
    assert np.all(np.abs(got - exact) <= bound), f"{name}: outside the dot-product bound"


def fused_layer(dtype):
    """A one-layer model's weights (the default model's proportions, smaller), as `fuse_projections`
    holds them, and a copy with every weight an array of its own."""
    config = tiny_config(n_layers=1, dim=96, n_heads=6, n_kv_heads=2, head_dim=16, ffn_dim=256)
    separate = {k: v.astype(dtype) for k, v in random_weights(config).items()}
    weights = dict(separate)
    linear.fuse_projections(weights, config.n_layers)
    return config, weights, separate


@pytest.fixture
def count_products(monkeypatch):
    """The number of `products.linear` calls so far, as a list of the weights' shapes."""
    calls = []
    run = products.linear

    def counted(x, w):
        calls.append(w.shape)
        return run(x, w)

    monkeypatch.setattr(products, "linear", counted)
    return calls


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_fused_products_are_the_separate_products(monkeypatch, count_products, dtype, T, n_threads):
    """In a decode step, one product of the joined weights gives each weight's product within
    float32's dot-product bound, which holds for any kernel (measured: the same bits, docs/DESIGN.md,
    "Fused products"); several rows run one product a weight. The names keep their exact values."""
    monkeypatch.setattr(products, "SPLIT_MIN_MACS", 1)  # blocks shared by the threads, even here
    before = products.get_threads()
    products.set_threads(n_threads)
    try:
        config, weights, separate = fused_layer(dtype)
        x = np.random.default_rng(1).normal(size=(T, config.dim)).astype(np.float32)
        for group in JOINED:
            names = [f"layers.0.{name}.weight" for name in group]
            ws = [weights[name] for name in names]
            assert all(np.array_equal(w, separate[name]) and w.base is ws[0].base for w, name in zip(ws, names))
            del count_products[:]
            fused = linear.linears(x, *ws)
            # a decode step: one product, of the joined array; several rows: one product each
            assert count_products == ([ws[0].base.shape] if T == 1 else [w.shape for w in ws])
            for got, w, name in zip(fused, ws, names):
                assert got.shape == (T, w.shape[0]) and got.dtype == np.float32
                within_dot_bound(got, x, w, name)
                within_dot_bound(linear.linear(x, separate[name]), x, w, name + " alone")
    finally:
        products.set_threads(before)


def test_weights_that_are_not_one_arrays_rows_run_as_separate_products(count_products):
    """Separate arrays, views out of order or with a gap, a LoRA weight among them: one product each."""
    config, weights, separate = fused_layer(np.float32)
    wq, wk, wv = (weights[f"layers.0.attention.{n}.weight"] for n in ("wq", "wk", "wv"))
    lora = LoraWeight(wk, np.ones((2, config.dim), np.float32), np.ones((wk.shape[0], 2), np.float32), 0.5)
    x = np.random.default_rng(1).normal(size=(3, config.dim)).astype(np.float32)
    for ws in [(separate["layers.0.attention.wq.weight"], wk, wv), (wq, wv, wk), (wq, wv), (wq, lora, wv)]:
        del count_products[:]
        got = linear.linears(x, *ws)
        assert len(count_products) == len(ws) + (ws[1] is lora) * 2  # LoRA: the base, A and B
        assert all(np.array_equal(g, linear.linear(x, w)) for g, w in zip(got, ws))


def test_memory_mapped_weights_stay_mapped():
    """Read-only arrays over a file's bytes (a bfloat16 checkpoint's mapping) are not copied into a
    joined array, which would make the whole file resident at load."""
    config, _, separate = fused_layer(np.float32)
    mapped = {k: np.frombuffer(v.tobytes(), v.dtype).reshape(v.shape) for k, v in separate.items()}
    weights = dict(mapped)
    linear.fuse_projections(weights, config.n_layers)
    assert all(weights[k] is mapped[k] for k in mapped)


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_forward_with_fused_weights_gives_the_logits_of_separate_ones(compute):
    """A prefill and decode steps with joined weights against separate ones: logits within
    FUSED_NMSE."""
    config = tiny_config()
    separate = mode_weights(random_weights(config), ComputeMode(compute))
    fused = dict(separate)
    linear.fuse_projections(fused, config.n_layers)
    assert linear.joined([fused[f"layers.1.feed_forward.{n}.weight"] for n in ("w1", "w3")])[0] is not None
    logits = {}
    for name, weights in (("fused", fused), ("separate", separate)):
        cache = KVCache(config, 12, compute)
        logits[name] = [forward(weights, config, [5, 17, 99, 3, 64, 64, 12], cache)]
        logits[name] += [forward(weights, config, [t], cache) for t in (7, 8, 9)]
    for a, b in zip(logits["fused"], logits["separate"]):
        assert nmse(a, b) <= FUSED_NMSE[compute]


@pytest.mark.parametrize("compute", ["float32", "bfloat16", "float16", "float64", "llamacpp"])
def test_the_default_model_loads_with_its_groups_joined_except_for_llama_cpp(compute):
    """load_model (and bench, through checkpoint_for) joins every layer's q/k/v and gate/up, with
    their exact values, except where llama.cpp's arithmetic multiplies each matrix alone."""
    model = load_model(default_model(), need_tokenizer=False, compute=compute)
    separate = load_checkpoint(default_model(), dtype="float32").weights
    for names in joined_names(model.config.n_layers):
        ws = [model.weights[name] for name in names]
        assert (linear.joined(ws)[0] is not None) == (compute != "llamacpp"), names
        if compute == "float32":
            assert all(np.array_equal(w, separate[name]) for w, name in zip(ws, names))
