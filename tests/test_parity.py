"""Every stage of llama3_np's forward pass against Meta's `llama-models` reference and Hugging Face
`transformers`, both run in float32 (and HF also in bfloat16) on the same bf16 weights.

The fixtures under tests/fixtures/parity/ are made by `python tools/make_reference_dumps.py`
(see the README there). Three configurations: llama3_0 (no rope scaling, untied output),
llama3_1 (llama3 scaling, factor 8), llama3_2 (factor 32, tied embeddings).

Tolerances (normalised MSE = sum of squared differences / sum of squared reference values):
- every case, positions from 0 and from 24,571: 1e-10 at every stage, and logits max relative
  error 1e-4 for the prompt. The two float32 references agree with each other to about 1e-12, so
  anything above 1e-10 is a real difference (measured: worst stage about 8e-13).
  At positions >= 20,000 the rotation angle position·frequency carries a float32 rounding error
  of up to position·2⁻²⁴ ≈ 1e-3 rad, which would allow only about 1e-6; we hold 1e-10 there too
  because `model.rope_cos_sin` rounds exactly where both references round (their frequency
  tables equal ours bit for bit, see the rope tests; cos/sin then differ by an ulp at most);
- against HF computing in bfloat16: 1e-2 (the bound llama.cpp uses for a passing conversion).

Every comparison runs in both residencies (float32, and bfloat16 converted inside each product:
the same values up to summation order), and in bfloat16 once more with every product cut into
blocks of a few rows shared by 3 threads, the path large models take (the fixtures' matrices are
otherwise too small to be split).
"""

import dataclasses
import decimal
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors import safe_open

from llama3_np import products
from llama3_np.formats.checkpoint import load_checkpoint, unpermute_qk
from llama3_np.config import ComputeMode, ModelConfig, from_hf_config
from llama3_np.model import KVCache, forward, rope_cos_sin, rope_frequencies
from llama3_np.stages import Trace
from tests.helpers import assert_close, max_rel_err, nmse

FIXTURES = Path(__file__).parent / "fixtures" / "parity"
CONFIGS = ["llama3_0", "llama3_1", "llama3_2"]
CASES = {"prompt": 1e-10, "far": 1e-10, "far_decode": 1e-10}


def load_dump(path: Path):
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


_checkpoints = {}


def checkpoint(name, residency="float32"):
    if (name, residency) not in _checkpoints:
        _checkpoints[name, residency] = load_checkpoint(FIXTURES / name, dtype=residency)
    return _checkpoints[name, residency]


@pytest.fixture(params=["float32", "bfloat16", "bfloat16 split over 3 threads"])
def residency(request, monkeypatch):
    if request.param.endswith("threads"):
        monkeypatch.setattr(products, "SPLIT_MIN_MACS", 0)
        monkeypatch.setattr(products, "CONVERT_BLOCK_BYTES", 4 * 64 * 5)  # 5 rows of the width-64 matrices
        before = products.get_threads()
        products.set_threads(3)
        yield "bfloat16"
        products.set_threads(before)
    else:
        yield request.param


def run_like(dump_meta, ckpt, trace: Trace, compute="float32"):
    """Run the same tokens at the same positions, with the same cache contents, as the dump."""
    tokens = json.loads(dump_meta["tokens"])
    context = json.loads(dump_meta["context_tokens"])
    cache = KVCache(ckpt.config, len(context) + len(tokens), compute)
    if context:
        forward(ckpt.weights, ckpt.config, context, cache, pos=int(dump_meta["context_pos"]))
    return forward(ckpt.weights, ckpt.config, tokens, cache, pos=int(dump_meta["pos"]), trace=trace)


def stage_errors(ours: Trace, ref: dict, tol: float):
    """(name, NMSE, max rel err) for every reference stage, and the lines of those past `tol`."""
    rows, bad = [], []
    for name, value in ref.items():
        assert name in ours, f"stage {name} missing from llama3_np's trace"
        e, r = nmse(ours[name], value), max_rel_err(ours[name], value)
        rows.append((name, e, r))
        if e > tol:
            bad.append(f"  {name}: NMSE {e:.3e} (max rel err {r:.3e})")
    return rows, bad


@pytest.mark.parametrize("ref", ["hf", "meta"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", CONFIGS)
def test_every_stage_matches_the_float32_references(name, case, ref, residency):
    ckpt = checkpoint(name, residency)
    dump, meta = load_dump(FIXTURES / name / f"{ref}_{case}.safetensors")
    assert ModelConfig.from_dict(json.loads(meta["config"])) == ckpt.config, "fixture config differs"
    trace = Trace()
    run_like(meta, ckpt, trace)
    tol = CASES[case]
    rows, bad = stage_errors(trace, dump, tol)
    assert len(rows) == 2 + ckpt.config.n_layers * 13 + 1, f"fixture has {len(rows)} stages"
    worst = max(rows, key=lambda row: row[1])
    assert not bad, (f"{name} {case} vs {meta['producer']}: {len(bad)} stages past NMSE {tol:.0e} "
                     f"(worst {worst[0]}):\n" + "\n".join(bad))
    if case == "prompt":
        r = max_rel_err(trace["logits"], dump["logits"])
        assert r <= 1e-4, f"{name} logits vs {meta['producer']}: max rel err {r:.3e} > 1e-4"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", CONFIGS)
def test_float64_mode_is_within_the_float32_tolerance_of_the_float32_references(name, case):
    """float64 mode is the exact value the float32 references approximate: every stage is within
    float32's tolerance of both. At position 0 that is the 1e-10 of the float32 comparisons; far
    out it is the 1e-6 that the references' float32 rotation angle allows (an error of up to
    position·2⁻²⁴ rad, see the module docstring), which float64 mode does not make (measured: worst
    stage 2e-8, q_rope and k_rope)."""
    ckpt = checkpoint(name)
    tol = 1e-10 if case == "prompt" else 1e-6
    for ref in ("hf", "meta"):
        dump, meta = load_dump(FIXTURES / name / f"{ref}_{case}.safetensors")
        trace = Trace()
        run_like(meta, ckpt, trace, compute="float64")
        rows, bad = stage_errors(trace, dump, tol)
        assert not bad, f"{name} {case} float64 vs {meta['producer']}:\n" + "\n".join(bad)


# llama3_np in a compute mode against the engine whose rounding it emulates, on the same three cases:
# fixture prefix -> (compute, convention, stage NMSE tolerance, how many times smaller the logits'
# NMSE must be than float32 mode's against the same engine output). Measured (CPU with AVX-512):
# bfloat16, both conventions, every stage bit for bit equal but for a few elements of a few stages
# one ulp apart (worst stage NMSE 3e-14), where float32 mode is 5e-5 to 1.4e-4 from the logits. One
# ulp of one typical element of a [16, 64] stage is NMSE 1.5e-8; 1e-6 allows a few percent of a
# stage's elements one ulp apart, as another CPU's summation order may give. float16 keeps three
# more bits, so float32 sums in another order land on the other side of a float16 rounding eight
# times as often, and each such element spreads to the next stages: worst stage 7e-7, logits 3 to
# 12 times closer than float32 mode's (1e-6 to 2e-6), not 100 times (BENCHMARKS.md, "Compute modes").
LOW_PRECISION = {
    "hf_bf16": ("bfloat16", "transformers", 1e-6, 100),
    "meta_bf16": ("bfloat16", "meta", 1e-6, 100),
    "hf_fp16": ("float16", "transformers", 1e-5, 2),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("prefix", list(LOW_PRECISION))
@pytest.mark.parametrize("name", CONFIGS)
def test_every_stage_matches_the_engine_whose_rounding_the_compute_mode_emulates(name, prefix, case):
    compute, convention, tol, gain = LOW_PRECISION[prefix]
    ckpt = checkpoint(name, "bfloat16")
    dump, meta = load_dump(FIXTURES / name / f"{prefix}_{case}.safetensors")
    assert meta["dtype"] == compute
    trace = Trace()
    run_like(meta, ckpt, trace, compute=ComputeMode(compute, convention))
    rows, bad = stage_errors(trace, dump, tol)
    assert not bad, f"{name} {case} {compute} ({convention}) vs {meta['producer']}:\n" + "\n".join(bad)
    ours = nmse(trace["logits"], dump["logits"])
    float32 = nmse(run_like(meta, ckpt, Trace(["logits"])), dump["logits"])
    assert ours * gain <= float32, (f"{name} {case}: logits NMSE {ours:.3e} in {compute} mode, only "
                                    f"{float32 / max(ours, 1e-300):.1f}x below float32 mode's {float32:.3e}")


@pytest.mark.parametrize("name", CONFIGS)
def test_the_two_conventions_round_rope_differently_as_their_sources_do(name):
    """transformers rounds cos, sin, both products and their sum to bfloat16; Meta rotates in
    complex64 and rounds once. Each convention matches its own engine's q_rope and not the other's."""
    ckpt = checkpoint(name, "bfloat16")
    for own, other, convention in (("hf_bf16", "meta_bf16", "transformers"), ("meta_bf16", "hf_bf16", "meta")):
        mine, meta = load_dump(FIXTURES / name / f"{own}_far.safetensors")
        theirs, _ = load_dump(FIXTURES / name / f"{other}_far.safetensors")
        trace = Trace(["layers.0.q_rope"])
        run_like(meta, ckpt, trace, compute=ComputeMode("bfloat16", convention))
        e_own, e_other = nmse(trace["layers.0.q_rope"], mine["layers.0.q_rope"]), nmse(
            trace["layers.0.q_rope"], theirs["layers.0.q_rope"])
        assert e_own <= 1e-8 and e_other >= 1e-6, f"{convention}: q_rope NMSE {e_own:.2e} own, {e_other:.2e} other"


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_hugging_face_computing_in_bfloat16(name, residency):
    ckpt = checkpoint(name, residency)
    dump, meta = load_dump(FIXTURES / name / "hf_bf16_prompt.safetensors")
    logits = run_like(meta, ckpt, Trace(["logits"]))
    assert_close(logits, dump["logits"], f"{name} logits vs HF bfloat16", 1e-2)


def test_llama32_follows_the_config_factor_32_not_metas_hard_coded_8(residency):
    """Meta's llama-models hard-codes the llama3 rope factor 8; Llama 3.2 1B/3B use 32, as their
    configs say. We follow the config: equal to HF, measurably different from Meta as shipped."""
    ckpt = checkpoint("llama3_2", residency)
    assert ckpt.config.rope_scaling.factor == 32
    shipped, meta = load_dump(FIXTURES / "llama3_2" / "meta8_far.safetensors")
    hf, _ = load_dump(FIXTURES / "llama3_2" / "hf_far.safetensors")
    trace = Trace()
    run_like(meta, ckpt, trace)
    for stage in ("layers.0.q_rope", "layers.0.k_rope"):
        e_shipped = nmse(trace[stage], shipped[stage])
        e_hf = nmse(trace[stage], hf[stage])
        assert e_shipped > 1e-2, f"{stage}: only NMSE {e_shipped:.3e} from Meta's factor-8 reference"
        assert e_hf <= 1e-6, f"{stage}: NMSE {e_hf:.3e} from HF (factor 32)"
    # The two references themselves disagree by as much.
    assert nmse(shipped["layers.0.q_rope"], hf["layers.0.q_rope"]) > 1e-2


ROPE_POSITIONS = [0, 8191, 8192, 32768, 131071]


def rope_cases():
    with safe_open(str(FIXTURES / "rope.safetensors"), framework="numpy") as f:
        meta = f.metadata()
    return load_file(str(FIXTURES / "rope.safetensors")), meta


ROPE_SHAPES = ["llama3_0_8b", "llama3_1_8b", "llama3_2_1b"]


def rope_config(meta, which):
    # The fixture records the rope part of each model's Hugging Face config; sizes that rope does
    # not use are filled in.
    hf = dict(json.loads(meta["configs"])[which], num_hidden_layers=1, intermediate_size=1, vocab_size=1)
    return from_hf_config(hf)


@pytest.mark.parametrize("which", ROPE_SHAPES)
def test_rope_table_equals_hugging_faces_and_metas_bit_for_bit(which):
    """Every step of the table is correctly rounded (see `rope_frequencies`), so it is one float32
    table on every CPU and NumPy dispatch path, and equal to the references' (which agree)."""
    data, meta = rope_cases()
    ours = rope_frequencies(rope_config(meta, which))
    for ref in ("inv_freq", "meta_freqs"):
        want = data[f"{which}.{ref}"]
        differ = np.flatnonzero(ours != want)
        assert differ.size == 0, (
            f"{which}: {differ.size} of {want.size} entries differ from {ref}, first at {differ[0]}: "
            f"{ours[differ[0]]!r} vs {want[differ[0]]!r} "
            f"({abs(int(ours.view(np.int32)[differ[0]]) - int(want.view(np.int32)[differ[0]]))} ulp)")


@pytest.mark.parametrize("which", ROPE_SHAPES)
def test_rope_powers_are_correctly_rounded(which):
    """The unscaled table, every shape's first step, is 1 / (the float32 nearest the exact power
    θ^(2i/Dh)), the power computed here with 40 significant digits: the table depends neither on
    the C library's last float64 bit nor on NumPy's float32 `pow`."""
    data, meta = rope_cases()
    cfg = rope_config(meta, which)
    unscaled = rope_frequencies(dataclasses.replace(cfg, rope_scaling=None))
    with decimal.localcontext(decimal.Context(prec=40)):
        for i, f in enumerate(unscaled):
            exponent = decimal.Decimal(float(np.float32(2 * i) / np.float32(cfg.head_dim)))
            exact = decimal.Decimal(cfg.rope_theta) ** exponent
            nearest = np.float32(float(exact))  # double rounding is checked just below
            half_ulp = decimal.Decimal(float(np.spacing(nearest))) / 2
            assert abs(exact - decimal.Decimal(float(nearest))) < half_ulp, f"{which} entry {i}"
            assert np.float32(1) / nearest == f, f"{which} entry {i}: {f!r} is not 1 / {nearest!r}"


@pytest.mark.parametrize("which", ROPE_SHAPES)
def test_rope_cos_sin_match_hugging_face_and_meta_at_far_positions(which):
    """Same table, same float32 angle p·f (an exactly rounded product, as both references form it),
    so only the cos/sin kernels differ: NumPy's float32 SIMD cos/sin (not correctly rounded, and
    different between the AVX2 and AVX-512 paths), torch's (Sleef) and libm's are each within about
    one ulp of the true value, and for values of magnitude ≤ 1 an ulp is at most 2⁻²⁴ ≈ 6e-8. Bound:
    2⁻²³ absolute per entry. (A one-ulp error in a frequency would move the angle at position
    131,071 by up to 131071 · 2⁻²⁴ ≈ 8e-3, far past it.) Measured on AVX2: 6e-8, one ulp."""
    data, meta = rope_cases()
    cfg = rope_config(meta, which)
    positions = np.array(json.loads(meta["positions"]))
    assert list(positions) == ROPE_POSITIONS
    cos, sin = rope_cos_sin(positions, rope_frequencies(cfg))
    half = cfg.head_dim // 2
    for got, key in ((cos, "cos"), (sin, "sin")):
        assert np.array_equal(data[f"{which}.{key}"][:, :half], data[f"{which}.{key}"][:, half:]), \
            "HF cos/sin halves should repeat"
        for producer, ref in (("HF", data[f"{which}.{key}"][:, :half]), ("Meta", data[f"{which}.meta_{key}"])):
            err = np.abs(got.astype(np.float64) - ref)
            worst = np.unravel_index(err.argmax(), err.shape)
            assert err.max() <= 2 ** -23, (
                f"{which} {key} vs {producer}: max abs err {err.max():.3e} "
                f"({err.max() / np.spacing(np.float32(abs(ref[worst]))):.1f} ulp) at position "
                f"{positions[worst[0]]}, pair {worst[1]}")


def test_hf_layout_and_meta_layout_give_the_same_attention_scores():
    """Hugging Face stores wq/wk rows permuted for its rotate-half rope; the loader un-permutes
    them to Meta's interleaved layout. Both forms must give the same q·k scores per head."""
    ckpt = checkpoint("llama3_1")
    cfg = ckpt.config
    hf = load_file(str(FIXTURES / "llama3_1" / "model.safetensors"))  # HF names and layout
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, cfg.dim)).astype(np.float32)
    positions = np.arange(12) + 20_000
    cos, sin = rope_cos_sin(positions, rope_frequencies(cfg))
    Dh = cfg.head_dim

    def rotate_half_rope(t):  # HF: t·cos + rotate_half(t)·sin with cos/sin halves repeated
        c, s = np.concatenate([cos, cos], -1)[:, None], np.concatenate([sin, sin], -1)[:, None]
        rotated = np.concatenate([-t[..., Dh // 2:], t[..., :Dh // 2]], -1)
        return t * c + rotated * s

    def interleaved_rope(t):
        from llama3_np.model import rope
        return rope(t, cos, sin)

    def scores(wq, wk, rope_fn):
        q = rope_fn((x @ np.asarray(wq, np.float32).T).reshape(12, cfg.n_heads, Dh))
        k = rope_fn((x @ np.asarray(wk, np.float32).T).reshape(12, cfg.n_kv_heads, Dh))
        k = np.repeat(k, cfg.n_rep, axis=1)
        return np.einsum("thd,shd->hts", q, k)

    hf_scores = scores(hf["model.layers.0.self_attn.q_proj.weight"],
                       hf["model.layers.0.self_attn.k_proj.weight"], rotate_half_rope)
    meta_scores = scores(ckpt.weights["layers.0.attention.wq.weight"],
                         ckpt.weights["layers.0.attention.wk.weight"], interleaved_rope)
    assert_close(meta_scores, hf_scores, "attention scores, Meta vs HF layout", 1e-12)
    # And the loader's un-permutation is what makes them equal: without it they differ.
    raw = scores(hf["model.layers.0.self_attn.q_proj.weight"],
                 hf["model.layers.0.self_attn.k_proj.weight"], interleaved_rope)
    assert nmse(raw, hf_scores) > 1e-2
    assert np.array_equal(unpermute_qk(hf["model.layers.0.self_attn.k_proj.weight"], cfg.n_kv_heads),
                          ckpt.weights["layers.0.attention.wk.weight"])
