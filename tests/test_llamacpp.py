"""llama.cpp's CPU arithmetic (llama3_np/llamacpp.py) against ggml's own functions, recorded by
tools/make_llamacpp_reference.py from llama-cpp-python 0.3.36's libggml-cpu.so."""

import json
from pathlib import Path

import numpy as np
import pytest

from llama3_np import assets, llamacpp
from llama3_np.formats.ggml_blocks import SUPPORTED, QuantizedWeight
from llama3_np.formats.safetensors_file import SafetensorsFile
from llama3_np.products import linear as exact_linear
from llama3_np.xcheck.replay import reads, replay
from tests.xcheck.test_dump import run_cli

FIXTURES = Path(__file__).parent / "fixtures" / "llamacpp"
TYPES_BY_NAME = {t.name: t for t in SUPPORTED.values()}


@pytest.fixture(scope="module")
def ggml():
    f = SafetensorsFile(FIXTURES / "activation_quantizers.safetensors")
    return {name: np.array(f.tensor(name)) for name in f.names()}


def nmse(a, ref):
    a, ref = np.asarray(a, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.sum((a - ref) ** 2) / np.sum(ref ** 2))


def test_q8_0_blocks_are_ggml_bit_for_bit(ggml):
    d, qs = llamacpp.quantize_q8_0(ggml["x"])
    assert np.array_equal(d.view(np.uint16), ggml["q8_0.d"].view(np.uint16))
    assert np.array_equal(qs, ggml["q8_0.qs"]), f"{(qs != ggml['q8_0.qs']).sum()} quants differ"


def test_q8_1_blocks_are_ggml_bit_for_bit(ggml):
    d, s, qs = llamacpp.quantize_q8_1(ggml["x"])
    assert np.array_equal(d.view(np.uint16), ggml["q8_1.d"].view(np.uint16))
    assert np.array_equal(s.view(np.uint16), ggml["q8_1.s"].view(np.uint16))
    assert np.array_equal(qs, ggml["q8_1.qs"]), f"{(qs != ggml['q8_1.qs']).sum()} quants differ"


def test_q8_k_blocks_are_ggml_bit_for_bit(ggml):
    d, qs = llamacpp.quantize_q8_k(ggml["x"])
    assert np.array_equal(d.view(np.uint32), ggml["q8_K.d"].view(np.uint32))
    assert np.array_equal(qs, ggml["q8_K.qs"]), f"{(qs != ggml['q8_K.qs']).sum()} quants differ"


def test_ties_round_to_even_as_ggml_x86_does():
    # 0.5 · 127/127 = 0.5 and 1.5: ties; AVX2's _mm256_round_ps takes the even neighbour, the
    # scalar reference (and gguf-py) would round them away from zero to 1 and 2.
    x = np.zeros((1, 32), dtype=np.float32)
    x[0, :3] = [127, 0.5, 1.5]
    assert llamacpp.quantize_q8_0(x)[1][0, 0, :3].tolist() == [127, 0, 2]


@pytest.mark.parametrize("type_name", ["F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_product_is_ggml_vec_dot_up_to_the_order_of_float32_sums(ggml, type_name):
    """Each weight type's product with activation rows, as ggml_mul_mat computes it: its
    vec_dot_type's conversion, then its vec_dot. Measured NMSE below 1e-13 for every type (float32
    sums of 512 terms in another order); exact math on unconverted rows is 1e-6 to 1e-4 away."""
    x, raw, reference = ggml["x"][6:], ggml[f"{type_name}.weight"], ggml[f"{type_name}.product"]
    t = TYPES_BY_NAME[type_name]
    base = raw.view(np.float16) if type_name == "F16" else QuantizedWeight(raw, t, (raw.shape[0], x.shape[1]))
    w = llamacpp.llamacpp_weight(base)
    got = llamacpp.product(x, w)
    exact = exact_linear(x, base)
    assert nmse(got, reference) < 1e-12, f"{type_name}: NMSE {nmse(got, reference):.3g}"
    assert nmse(exact, reference) > 100 * max(nmse(got, reference), 1e-15), (
        f"{type_name}: exact math {nmse(exact, reference):.3g} is as close as llama.cpp's arithmetic")


@pytest.mark.parametrize("type_name", ["F16", "Q4_1", "Q6_K"])
def test_float64_products_of_weights_held_for_llama_cpp_are_the_exact_values(ggml, type_name):
    """`adjudicate` replays in float64 on the weights `--compute llamacpp` loaded: `linear` then
    multiplies the values the blocks stand for, in float64, not llama.cpp's quantized activations."""
    from llama3_np.formats.ggml_blocks import dequantize_rows
    from llama3_np.linear import linear, mode_weights
    from llama3_np.config import ComputeMode

    x, raw = ggml["x"][6:].astype(np.float64), ggml[f"{type_name}.weight"]
    t = TYPES_BY_NAME[type_name]
    base = raw.view(np.float16) if type_name == "F16" else QuantizedWeight(raw, t, (raw.shape[0], x.shape[1]))
    values = base.astype(np.float64) if type_name == "F16" else dequantize_rows(raw, t).astype(np.float64)
    want = x @ values.T
    for w in (base, llamacpp.llamacpp_weight(base), mode_weights({"w": base}, ComputeMode("float64"))["w"]):
        got = linear(x, w)
        assert got.dtype == np.float64 and np.allclose(got, want, rtol=1e-13, atol=1e-13 * np.abs(want).max())


def test_vectors_stay_as_they_are_and_unknown_types_are_named():
    norm = np.ones(4, dtype=np.float32)
    assert llamacpp.llamacpp_weight(norm) is norm
    with pytest.raises(ValueError, match="float64"):
        llamacpp.LlamaCppWeight(np.ones((2, 32)))


def test_a_model_loaded_for_llamacpp_holds_each_matrix_wrapped_once():
    """load_model wraps every matrix once (its Q4_1 offsets converted to float32 then, not in each
    product); every forward pass takes that wrapper as it is, and another mode its stored weight."""
    from llama3_np.config import ComputeMode
    from llama3_np.load import load_model

    loaded = load_model(assets.default_model(), compute="llamacpp")
    wq = loaded.weights["layers.0.attention.wq.weight"]
    assert isinstance(wq, llamacpp.LlamaCppWeight) and wq.type == "Q4_1"
    assert loaded.checkpoint.dtype == "gguf" and wq.nbytes == wq.base.nbytes
    assert wq.offsets.dtype == np.float32 and wq.offsets.shape == (wq.shape[0], wq.shape[1] // 32)
    assert loaded.compute.weight(wq) is wq and ComputeMode("float32").weight(wq) is wq.base
    assert loaded.weights["layers.0.attention_norm.weight"].ndim == 1  # a vector as it is


# --- llama.cpp's own stages (tools/llamacpp_dump.py) against compute mode "llamacpp" -------------

TINY_GGUF = Path(__file__).parent / "fixtures" / "checkpoints" / "gguf_q8_0.gguf"


@pytest.mark.parametrize("compute, agrees", [("llamacpp", True), ("float32", False)])
def test_every_stage_of_llama_cpp_on_a_tiny_q8_0_gguf(tmp_path, capsys, compute, agrees):
    """A plain comparison (each side runs on its own) of llama.cpp's stages on a 2-layer Q8_0 GGUF:
    llama.cpp's arithmetic agrees at every stage (measured worst NMSE 2e-14, the probabilities and
    logits included); exact math does not (worst 3e-4, from the first product on)."""
    ours = tmp_path / "ours.safetensors"
    code, _, err = run_cli(capsys, "dump", "-m", TINY_GGUF, "--compute", compute, "--like",
                           FIXTURES / "tiny_q8_0.safetensors", "--stages", "*", "layers.*.probs", "-o", ours)
    assert code == 0, err
    code, out, _ = run_cli(capsys, "compare", FIXTURES / "tiny_q8_0.safetensors", ours, "--json")
    result = json.loads(out)
    worst = max(s["nmse"] for s in result["stages"])
    assert len(result["stages"]) == 31
    if agrees:
        assert code == 0 and worst < 1e-12, f"worst stage NMSE {worst:.3g}: {result['past_tolerance']}"
    else:
        assert code == 1 and worst > 1e-5, f"exact math agrees with llama.cpp to {worst:.3g}"


def replayed_on_its_own_input(stages, n_layers: int = 30) -> dict[str, float]:
    """Local NMSE of the replayed stages whose input the dump records itself (`replay.reads`):
    the error the stage adds. (Layer 29's input, layers.28.out, is recorded for that; its own
    local error would be everything llama3_np computes freely from layer 0 to 28.)"""
    return {name: nmse for name, source, nmse in stages if source == reads(name, n_layers)}


@pytest.mark.parametrize("compute, agrees", [("llamacpp", True), ("float32", False)])
def test_each_stage_of_llama_cpp_replayed_on_the_default_model(capsys, compute, agrees):
    """The default model's Q4_1 file: each stage of llama.cpp's first and last layers computed by
    llama3_np from llama.cpp's own input to it (`compare --replay`). In llama.cpp's arithmetic no
    stage adds more than NMSE 5e-13 (measured 4e-13); in exact math every product adds 1e-5 to 1e-3.
    (A plain comparison cannot agree on a 30-layer model: docs/DESIGN.md, "Numerical facts".)"""
    code, out, _ = run_cli(capsys, "compare", FIXTURES / "default_q4_1.safetensors", "--replay", "-m",
                           assets.default_model(), "--compute", compute, "--json")
    local = replayed_on_its_own_input((s["name"], s["input"], s["local"]["nmse"]) for s in json.loads(out)["stages"])
    assert len(local) == 1 + 2 * 14 + 1  # embed, layers 0 and 29, norm
    if agrees:
        assert max(local.values()) < 1e-11, sorted(local.items(), key=lambda kv: -kv[1])[:3]
    else:
        assert min(local[f"layers.{i}.{s}"] for i in (0, 29) for s in ("v", "attn_out", "ffn_out")) > 1e-6


def requantized_default_model(type_name: str):
    """The default model with every matrix requantized to `type_name` by gguf-py, as
    tools/make_llamacpp_reference.py made the GGUF llama.cpp ran (the same blocks, byte for byte:
    the same exact values through the same quantizer); norms as they are."""
    gguf = pytest.importorskip("gguf")
    from llama3_np.formats.checkpoint import load_checkpoint
    from llama3_np.formats.ggml_blocks import dequantize_rows

    checkpoint = load_checkpoint(assets.default_model(), "gguf")
    qtype = TYPES_BY_NAME[type_name]
    weights, done = {}, {}
    for name, w in checkpoint.weights.items():
        if isinstance(w, QuantizedWeight) and id(w) not in done:
            raw = gguf.quants.quantize(dequantize_rows(w.raw, w.type), gguf.GGMLQuantizationType[type_name])
            done[id(w)] = QuantizedWeight(raw, qtype, w.shape)
        weights[name] = done.get(id(w), w)
    return weights, checkpoint.config


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0"])
def test_the_last_layer_of_llama_cpp_replayed_on_requantized_default_models(type_name):
    """The default model requantized to Q8_0 and Q4_0: llama.cpp's last layer and norm, each stage
    recomputed from llama.cpp's own input.
    Measured: no stage adds more than NMSE 3.3e-13 in llama.cpp's arithmetic; exact math's products
    add 1e-5 to 1e-3."""
    from llama3_np.xcheck.dump import read_dump
    weights, config = requantized_default_model(type_name)
    dump = read_dump(FIXTURES / f"default_{type_name.lower()}.safetensors")
    ours, exact = (replayed_on_its_own_input((r.name, r.input, r.local.nmse) for r in
                                             replay(weights, config, dump, compute=compute))
                   for compute in ("llamacpp", "float32"))
    assert max(ours.values()) < 1e-11, sorted(ours.items(), key=lambda kv: -kv[1])[:3]
    for stage in ("v", "attn_out", "ffn_out"):
        assert exact[f"layers.29.{stage}"] > 1e-6, (stage, exact[f"layers.29.{stage}"])
