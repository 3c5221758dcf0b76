"""ModelConfig from Hugging Face config.json and Meta params.json, checked against the published
sizes of real Llama 3 models."""

import pytest

from llama3_np import Llama3Error
from llama3_np.config import (ROPE_FACTOR_SOURCES, ModelConfig, RopeScaling, from_hf_config, from_meta_params,
                              meta_ffn_dim)

# Published Meta params.json values -> the FFN width of the released checkpoints.
META_FFN = [
    # name, dim, multiple_of, ffn_dim_multiplier, ffn_dim of the checkpoint
    ("3.1-8B", 4096, 1024, 1.3, 14336),
    ("3.1-70B", 8192, 4096, 1.3, 28672),
    ("3.1-405B", 16384, 4096, 1.2, 53248),
    ("3.2-1B", 2048, 256, 1.5, 8192),
    ("3.2-3B", 3072, 256, 1.0, 8192),
]


@pytest.mark.parametrize("name,dim,multiple_of,mult,ffn", META_FFN)
def test_meta_ffn_dim_matches_released_checkpoints(name, dim, multiple_of, mult, ffn):
    assert meta_ffn_dim(dim, multiple_of, mult) == ffn, name


LLAMA_32_1B_HF = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 8192, "num_attention_heads": 32, "num_hidden_layers": 16,
    "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-05, "vocab_size": 128256,
    "max_position_embeddings": 131072, "tie_word_embeddings": True, "hidden_act": "silu",
    "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}


def test_hf_config_older_rope_keys():
    c = from_hf_config(LLAMA_32_1B_HF)
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.vocab_size) == \
        (2048, 16, 32, 8, 64, 8192, 128256)
    assert c.rope_theta == 500000.0 and c.norm_eps == 1e-5 and c.tie_embeddings
    assert c.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)
    assert c.n_rep == 4


def test_hf_config_newer_rope_parameters_key_gives_the_same_config():
    newer = {k: v for k, v in LLAMA_32_1B_HF.items() if k not in ("rope_theta", "rope_scaling")}
    newer["rope_parameters"] = dict(LLAMA_32_1B_HF["rope_scaling"], rope_theta=500000.0)
    assert from_hf_config(newer) == from_hf_config(LLAMA_32_1B_HF)


def test_hf_config_llama30_has_no_scaling():
    cfg = dict(LLAMA_32_1B_HF, rope_scaling=None, max_position_embeddings=8192)
    assert from_hf_config(cfg).rope_scaling is None


def test_meta_params_32_1b_resolves_factor_32_and_3_1_8b_factor_8():
    p1b = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
           "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05,
           "rope_theta": 500000.0, "use_scaled_rope": True}
    c = from_meta_params(p1b, tie_embeddings=True)
    assert c == from_hf_config(LLAMA_32_1B_HF)
    assert c.rope_scaling.factor_source == "shape"
    assert from_meta_params(p1b, rope_factor=8.0).rope_scaling.factor == 8.0
    p8b = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
           "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "norm_eps": 1e-05,
           "rope_theta": 500000.0, "use_scaled_rope": True}
    c8 = from_meta_params(p8b)
    assert c8.rope_scaling.factor == 8.0 and c8.ffn_dim == 14336 and c8.max_seq_len == 131072
    assert c8.rope_scaling.factor_source == "default"
    c30 = from_meta_params(dict(p8b, use_scaled_rope=False))
    assert c30.rope_scaling is None and c30.max_seq_len == 8192


def test_config_round_trips_through_dict():
    c = from_hf_config(LLAMA_32_1B_HF)
    assert ModelConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("change,message", [
    ({"num_key_value_heads": 5}, "multiple of n_kv_heads"),
    ({"hidden_size": "2048"}, "hidden_size must be an integer"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4}}, "rope type 'yarn'"),
    ({"model_type": "mistral"}, "model_type is 'mistral'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"num_hidden_layers": None}, "num_hidden_layers must be an integer"),
])
def test_bad_hf_config_is_a_clear_error(change, message):
    with pytest.raises(Llama3Error, match=message):
        from_hf_config(dict(LLAMA_32_1B_HF, **change))


def test_missing_key_names_the_key():
    cfg = {k: v for k, v in LLAMA_32_1B_HF.items() if k != "vocab_size"}
    with pytest.raises(Llama3Error, match="missing key 'vocab_size'"):
        from_hf_config(cfg)


P_1B = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
        "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0,
        "use_scaled_rope": True}


@pytest.mark.parametrize("params,kwargs,factor,source", [
    (P_1B, {"rope_factor": 4.0}, 4.0, "override"),
    (dict(P_1B, rope_scaling_factor=16.0), {}, 16.0, "config"),
    # The Hugging Face config of the same download wins over the shape...
    (P_1B, {"hf_config": from_hf_config(dict(LLAMA_32_1B_HF, rope_scaling=dict(
        LLAMA_32_1B_HF["rope_scaling"], factor=16.0)))}, 16.0, "hf_config"),
    # ...but not over an explicit override, and only when it describes the same model.
    (P_1B, {"hf_config": from_hf_config(LLAMA_32_1B_HF), "rope_factor": 8.0}, 8.0, "override"),
    (P_1B, {"hf_config": from_hf_config(dict(LLAMA_32_1B_HF, num_hidden_layers=28))}, 32.0, "shape"),
    (P_1B, {}, 32.0, "shape"),
    (dict(P_1B, n_layers=15), {}, 8.0, "default"),
])
def test_meta_rope_factor_and_where_it_came_from(params, kwargs, factor, source):
    s = from_meta_params(params, **kwargs).rope_scaling
    assert (s.factor, s.factor_source) == (factor, source)
    assert source in ROPE_FACTOR_SOURCES


def test_the_factor_source_is_recorded_but_not_part_of_the_math():
    hf = from_hf_config(LLAMA_32_1B_HF)
    meta = from_meta_params(P_1B, tie_embeddings=True)
    assert hf.rope_scaling.factor_source == "config" and meta.rope_scaling.factor_source == "shape"
    assert hf == meta
    assert "factor_source" not in meta.to_dict()["rope_scaling"]  # nor, then, in a dump's config
