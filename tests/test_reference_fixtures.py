"""The committed torch reference fixtures (tests/fixtures/parity/, made by
tools/make_reference_dumps.py) checked against each other and against their own metadata.

The parity tests of llama3_np's forward pass trust these files; here they earn that trust: the two
independent references (Hugging Face transformers and Meta's llama-models) agree at every stage,
every dump is complete and consistent with its checkpoint, q/k are in Meta's interleaved layout,
and the Llama 3.2 rope factor visibly matters where it should.
"""

import json
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy for safetensors.numpy)
import numpy as np
import pytest
from safetensors import safe_open

from llama3_np.config import ModelConfig, from_hf_config, from_meta_params
from llama3_np.stages import stage_shapes
from tests.helpers import nmse

FIXTURES = Path(__file__).parent / "fixtures" / "parity"
CONFIGS = ["llama3_0", "llama3_1", "llama3_2"]
CASES = ["prompt", "far", "far_decode"]
AGREEMENT_NMSE = 1e-10  # Hugging Face vs Meta, both float32
FAR_MIN_POS = 20000


def load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def hf_config(cfg: str) -> ModelConfig:
    return from_hf_config(json.loads((FIXTURES / cfg / "config.json").read_text()))


def expected_shapes(c: ModelConfig, T: int) -> dict[str, tuple]:
    """The stage contract's names and shapes, without the probabilities the references never record."""
    return stage_shapes(c, T, probs=False)


def stage_dumps(cfg: str) -> list[Path]:
    return sorted(p for p in (FIXTURES / cfg).glob("*.safetensors") if p.name != "model.safetensors")


def test_every_configuration_has_its_files():
    for cfg in CONFIGS:
        names = {p.name for p in (FIXTURES / cfg).iterdir()}
        wanted = {"config.json", "params.json", "model.safetensors"}
        wanted |= {f"{who}_{case}.safetensors" for who in ("hf", "meta", "hf_bf16", "hf_fp16", "meta_bf16")
                   for case in CASES}
        if cfg == "llama3_2":
            wanted |= {"meta8_prompt.safetensors", "meta8_far.safetensors"}
        assert wanted <= names, f"{cfg}: missing {sorted(wanted - names)}"


def test_configurations_are_the_three_rope_variants():
    c0, c1, c2 = (hf_config(cfg) for cfg in CONFIGS)
    assert c0.rope_scaling is None and not c0.tie_embeddings and c0.max_seq_len == 8192
    assert c1.rope_scaling.factor == 8 and not c1.tie_embeddings and c1.max_seq_len == 131072
    assert c2.rope_scaling.factor == 32 and c2.tie_embeddings and c2.max_seq_len == 131072
    for c in (c0, c1, c2):
        assert c.n_layers >= 2 and c.head_dim >= 16 and c.n_heads // c.n_kv_heads >= 2, c


@pytest.mark.parametrize("cfg", CONFIGS)
def test_params_json_describes_the_same_model(cfg):
    """Meta's params.json (as Meta writes it: the factor unsaid) and config.json agree."""
    config = hf_config(cfg)
    params = json.loads((FIXTURES / cfg / "params.json").read_text())
    factor = config.rope_scaling.factor if config.rope_scaling else None
    meta = from_meta_params(params, tie_embeddings=config.tie_embeddings, rope_factor=factor)
    assert meta == config, f"params.json gives {meta}, config.json {config}"


@pytest.mark.parametrize("cfg", CONFIGS)
def test_checkpoint_weights(cfg):
    c = hf_config(cfg)
    with safe_open(str(FIXTURES / cfg / "model.safetensors"), framework="numpy") as f:
        w = {k: f.get_tensor(k) for k in f.keys()}
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.dim), "model.norm.weight": (c.dim,)}
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (c.dim,), p + "post_attention_layernorm.weight": (c.dim,),
            p + "self_attn.q_proj.weight": (q, c.dim), p + "self_attn.k_proj.weight": (kv, c.dim),
            p + "self_attn.v_proj.weight": (kv, c.dim), p + "self_attn.o_proj.weight": (c.dim, q),
            p + "mlp.gate_proj.weight": (c.ffn_dim, c.dim), p + "mlp.up_proj.weight": (c.ffn_dim, c.dim),
            p + "mlp.down_proj.weight": (c.dim, c.ffn_dim)})
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.dim)
    assert {k: v.shape for k, v in w.items()} == shapes
    assert {str(v.dtype) for v in w.values()} == {"bfloat16"}
    for name, weight in w.items():
        if name.endswith("norm.weight"):
            # Norm weights far from all-ones, so that a forgotten norm weight changes every stage.
            spread = float(np.abs(weight.astype(np.float32) - 1).max())
            assert spread > 0.1, f"{name}: max |w - 1| = {spread}"


@pytest.mark.parametrize("cfg", CONFIGS)
def test_dumps_have_every_stage_and_consistent_metadata(cfg):
    config = hf_config(cfg)
    prompt_tokens = json.loads(load(FIXTURES / cfg / "hf_prompt.safetensors")[1]["tokens"])
    far_meta = load(FIXTURES / cfg / "hf_far.safetensors")[1]
    for path in stage_dumps(cfg):
        stages, meta = load(path)
        where = f"{cfg}/{path.name}"
        assert ModelConfig.from_dict(json.loads(meta["config"])) == config, where
        tokens, context = json.loads(meta["tokens"]), json.loads(meta["context_tokens"])
        pos, context_pos = int(meta["pos"]), int(meta["context_pos"])
        case = meta["case"]
        assert path.stem.endswith(case), where
        assert all(isinstance(t, int) and 0 <= t < config.vocab_size for t in tokens + context), where
        assert meta["dtype"] in ("float32", "bfloat16", "float16") and meta["producer"], where
        assert meta["rope_factor_used"] == (f"{config.rope_scaling.factor:g}" if config.rope_scaling
                                            else "none") or path.name.startswith("meta8_"), where
        if case == "prompt":
            assert (pos, context, tokens) == (0, [], prompt_tokens), where
        elif case == "far":
            assert pos >= FAR_MIN_POS and context == [] and context_pos == pos, where
        else:
            assert len(tokens) == 1 and context == json.loads(far_meta["tokens"]), where
            assert context_pos == int(far_meta["pos"]) and pos == context_pos + len(context), where
        shapes = expected_shapes(config, len(tokens))
        assert {k: v.shape for k, v in stages.items()} == shapes, where
        for name, x in stages.items():
            assert x.dtype == np.float32 and np.isfinite(x).all(), f"{where} {name}"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_hugging_face_and_meta_agree_at_every_stage(cfg, case):
    hf, hf_meta = load(FIXTURES / cfg / f"hf_{case}.safetensors")
    meta, meta_meta = load(FIXTURES / cfg / f"meta_{case}.safetensors")
    for key in ("tokens", "pos", "context_tokens", "context_pos", "config", "rope_factor_used"):
        assert hf_meta[key] == meta_meta[key], key
    errors = {name: nmse(meta[name], hf[name]) for name in hf}
    worst = sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    assert worst[0][1] <= AGREEMENT_NMSE, f"{cfg} {case}: NMSE Meta vs HF, worst stages {worst}"
    assert set(meta) == set(hf)


def test_llama32_meta_as_shipped_differs_far_away_only_in_rope():
    """Meta's llama-models hard-codes rope factor 8; Llama 3.2 1B/3B need 32. At position 24,571
    the factor-8 rotation is clearly wrong (q_rope, k_rope), while Meta patched to factor 32
    agrees with Hugging Face, and the q before rope of layer 0 (no rope upstream) is the same."""
    hf, _ = load(FIXTURES / "llama3_2" / "hf_far.safetensors")
    meta32, _ = load(FIXTURES / "llama3_2" / "meta_far.safetensors")
    meta8, meta8_meta = load(FIXTURES / "llama3_2" / "meta8_far.safetensors")
    assert meta8_meta["rope_factor_used"] == "8"
    assert int(meta8_meta["pos"]) >= FAR_MIN_POS
    assert nmse(meta8["layers.0.q"], hf["layers.0.q"]) <= AGREEMENT_NMSE
    assert nmse(meta8["layers.0.k"], hf["layers.0.k"]) <= AGREEMENT_NMSE
    for i in range(hf_config("llama3_2").n_layers):
        for stage in (f"layers.{i}.q_rope", f"layers.{i}.k_rope"):
            wrong, right = nmse(meta8[stage], hf[stage]), nmse(meta32[stage], hf[stage])
            assert wrong > 0.1, f"{stage}: factor 8 vs HF (factor 32) NMSE {wrong:.3g}, expected ~0.35"
            assert right <= AGREEMENT_NMSE, f"{stage}: Meta patched to 32 vs HF NMSE {right:.3g}"


def test_llama32_meta_as_shipped_barely_differs_near_position_0():
    """Near position 0 the factor hardly matters: logits alone would not catch a wrong factor."""
    hf, _ = load(FIXTURES / "llama3_2" / "hf_prompt.safetensors")
    meta8, _ = load(FIXTURES / "llama3_2" / "meta8_prompt.safetensors")
    err = nmse(meta8["logits"], hf["logits"])
    assert 1e-10 < err < 1e-5, f"factor 8 vs factor 32 logits at positions 0..15: NMSE {err:.3g}"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_low_precision_stages_hold_their_dtypes_values_close_to_float32_but_not_equal(cfg, case):
    """Each engine's stages are values of its dtype (stored exactly as float32), of the same
    computation as the float32 file (bf16: NMSE ~1e-4 from it, float16 ~1e-6, neither 0)."""
    for prefix, dtype, lo, hi in (("hf_bf16", ml_dtypes.bfloat16, 1e-6, 1e-2), ("meta_bf16", ml_dtypes.bfloat16, 1e-6, 1e-2),
                                  ("hf_fp16", np.float16, 1e-8, 1e-4)):
        f32, f32_meta = load(FIXTURES / cfg / f"{'meta' if prefix.startswith('meta') else 'hf'}_{case}.safetensors")
        low, meta = load(FIXTURES / cfg / f"{prefix}_{case}.safetensors")
        assert meta["dtype"] == np.dtype(dtype).name
        for key in ("tokens", "pos", "context_tokens", "context_pos", "config", "rope_factor_used"):
            assert meta[key] == f32_meta[key], (prefix, key)
        for name, x in low.items():
            assert np.array_equal(x.astype(dtype).astype(np.float32), x), f"{cfg} {prefix}_{case} {name}"
        err = nmse(low["logits"], f32["logits"])
        assert lo < err < hi, f"{cfg} {prefix}_{case}: logits NMSE {err:.3g} from float32"


@pytest.mark.parametrize("cfg", CONFIGS)
def test_activations_have_order_one_spread(cfg):
    """Random weights scaled so that no stage is vanishing or saturated."""
    stages, _ = load(FIXTURES / cfg / "hf_prompt.safetensors")
    for name, x in stages.items():
        assert 0.05 < float(np.std(x)) < 10, f"{cfg} {name}: std {np.std(x):.3g}"
    logits = stages["logits"]
    assert len(set(np.argmax(logits, axis=-1).tolist())) > 1, f"{cfg}: one prediction everywhere"


def _pairs(x):  # [..., Dh] -> [..., Dh/2, 2]: Meta's rope pairs (2j, 2j+1)
    return x.reshape(*x.shape[:-1], -1, 2)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_q_and_k_are_in_meta_interleaved_layout(cfg):
    """Rope rotates each pair (2j, 2j+1) of Meta's layout, so it keeps the length of every such
    pair; in Hugging Face's rotate-half layout it would keep (j, Dh/2 + j) instead. Up to the
    rounding of the file's dtype: a few of its ulps (2^-8 relative in bfloat16, 2^-11 in float16)."""
    tolerance = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}
    for path in stage_dumps(cfg):
        stages, meta = load(path)
        for name in stages:
            if name.endswith((".q", ".k")):
                before = np.linalg.norm(_pairs(stages[name]), axis=-1)
                after = np.linalg.norm(_pairs(stages[name + "_rope"]), axis=-1)
                err = float(np.abs(after - before).max() / before.max())
                assert err < tolerance[meta["dtype"]], f"{cfg}/{path.name} {name}: pair lengths change by {err:.3g}"


def test_hf_q_rope_is_meta_rotation_of_q():
    """Llama 3.0 (no scaling) at positions 0..15: q_rope = q with pair j turned by pos * theta^(-2j/Dh)."""
    c = hf_config("llama3_0")
    inv_freq = c.rope_theta ** (-np.arange(0, c.head_dim, 2) / c.head_dim)
    for who in ("hf", "meta"):
        stages, meta = load(FIXTURES / "llama3_0" / f"{who}_prompt.safetensors")
        angle = np.arange(len(json.loads(meta["tokens"])))[:, None] * inv_freq  # [T, Dh/2]
        cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
        for i in range(c.n_layers):
            for name in ("q", "k"):
                x = _pairs(stages[f"layers.{i}.{name}"].astype(np.float64))
                even, odd = x[..., 0], x[..., 1]
                rotated = np.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
                got = _pairs(stages[f"layers.{i}.{name}_rope"])
                err = nmse(got, rotated)
                assert err < 1e-12, f"{who} layers.{i}.{name}_rope vs rotation of {name}: NMSE {err:.3g}"


# rope.safetensors: Hugging Face and Meta rope tables for real Llama 3 shapes.
ROPE_MODELS = {"llama3_0_8b": (128, None), "llama3_1_8b": (128, 8.0), "llama3_2_1b": (64, 32.0)}


def test_rope_tables():
    tables, meta = load(FIXTURES / "rope.safetensors")
    positions = np.array(json.loads(meta["positions"]))
    assert positions.tolist() == [0, 8191, 8192, 32768, 131071]
    configs = json.loads(meta["configs"])
    for key, (dh, factor) in ROPE_MODELS.items():
        assert configs[key]["head_dim"] == dh and configs[key]["meta_rope_factor"] == factor
        inv_freq, cos, sin = (tables[f"{key}.{n}"] for n in ("inv_freq", "cos", "sin"))
        assert inv_freq.shape == (dh // 2,) and cos.shape == sin.shape == (len(positions), dh)
        # Meta's frequency table is Hugging Face's, bit for bit (the script refuses otherwise).
        assert np.array_equal(tables[f"{key}.meta_freqs"], inv_freq), key
        # Hugging Face duplicates the halves (rotate-half); the angle is a float32 product.
        assert np.array_equal(cos[:, :dh // 2], cos[:, dh // 2:]), key
        angle = (positions[:, None].astype(np.float32) * inv_freq).astype(np.float64)
        err = max(np.abs(cos[:, :dh // 2] - np.cos(angle)).max(), np.abs(sin[:, :dh // 2] - np.sin(angle)).max())
        assert err < 1e-6, f"{key}: cos/sin vs cos/sin(position * inv_freq): max error {err:.3g}"
        # Meta's complex table (patched to the config's factor for 3.2) is the same rotation.
        err = max(np.abs(tables[f"{key}.meta_cos"] - cos[:, :dh // 2]).max(),
                  np.abs(tables[f"{key}.meta_sin"] - sin[:, :dh // 2]).max())
        assert err < 1e-6, f"{key}: Meta vs Hugging Face rope table: max error {err:.3g}"
        # llama3 scaling: high frequencies (wavelength < 8192/4) kept, low ones (> 8192) / factor.
        plain = 500000.0 ** (-np.arange(0, dh, 2) / dh)
        wavelen = 2 * np.pi / plain
        high, low = wavelen < 2048, wavelen > 8192
        assert high.any() and low.any()
        np.testing.assert_allclose(inv_freq[high], plain[high], rtol=1e-6, err_msg=key)
        np.testing.assert_allclose(inv_freq[low], plain[low] / (factor or 1), rtol=1e-6, err_msg=key)
