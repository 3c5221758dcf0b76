"""One tiny checkpoint in every format (tests/fixtures/checkpoints, made by
tools/make_checkpoint_fixtures.py with torch, llama-models and gguf) loads to the same canonical
weights: bit-identical for the lossless formats, within quantization error for Q8_0."""

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from llama3_np.formats.checkpoint import load_checkpoint
from llama3_np.config import ModelConfig, RopeScaling

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints"
from llama3_np.formats import gguf_import, gguf_to_hf  # noqa: E402

FIXTURE_CONFIG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64, vocab_size=128,
                             norm_eps=1e-5, rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
                             max_seq_len=131072, tie_embeddings=False)
LOSSLESS = ["hf", "hf_sharded", "meta", "meta_2shards", "gguf_f32.gguf"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The two GGUF fixtures imported into Hugging Face folders."""
    out = tmp_path_factory.mktemp("imported")
    return {name: gguf_to_hf.import_gguf(FIXTURES / name, out / name) for name in ("gguf_f32.gguf", "gguf_q8_0.gguf")}


def _folder(name, imported):
    return imported[name] if name.endswith(".gguf") else FIXTURES / name


def _bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


@pytest.fixture(scope="module")
def reference():
    """The Meta single-shard checkpoint: torch wrote it from the canonical arrays, nothing renamed."""
    return load_checkpoint(FIXTURES / "meta", dtype="bfloat16")


@pytest.mark.parametrize("residency", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_formats_load_to_bit_identical_weights(name, residency, imported, reference):
    ckpt = load_checkpoint(_folder(name, imported), dtype=residency)
    assert ckpt.config == FIXTURE_CONFIG
    assert ckpt.format == ("meta" if name.startswith("meta") else "hf")
    assert ckpt.weights.keys() == reference.weights.keys()
    for key, want in reference.weights.items():
        got = ckpt.weights[key]
        assert got.shape == want.shape, key
        assert got.dtype == (np.float32 if residency == "float32" else ml_dtypes.bfloat16), key
        assert np.array_equal(_bits(got), _bits(want)), f"{name} {key}: differs from the Meta checkpoint"
    assert ckpt.weights["output.weight"] is not ckpt.weights["tok_embeddings.weight"]


def test_two_shards_really_are_split_the_way_the_loader_merges_them():
    """Each shard holds half of every split tensor, along the model-parallel axis llama-models used."""
    from llama3_np.formats.pth import PthFile
    shards = [PthFile(FIXTURES / "meta_2shards" / f"consolidated.0{k}.pth") for k in range(2)]
    assert shards[0].shape("tok_embeddings.weight") == (64, 32)  # vocab-parallel: dim 0 (Llama 2: dim 1)
    assert shards[0].shape("output.weight") == (64, 32)
    assert shards[0].shape("layers.0.attention.wq.weight") == (16, 32)
    assert shards[0].shape("layers.0.attention.wk.weight") == (8, 32)
    assert shards[0].shape("layers.0.attention.wo.weight") == (32, 16)
    assert shards[0].shape("layers.1.feed_forward.w2.weight") == (32, 32)
    assert shards[0].shape("layers.1.feed_forward.w3.weight") == (32, 32)
    assert shards[0].shape("norm.weight") == (32,)


def test_q8_0_gguf_is_within_its_quantization_error(imported, reference):
    ckpt = load_checkpoint(imported["gguf_q8_0.gguf"], dtype="float32")
    assert ckpt.config == FIXTURE_CONFIG
    for key, want in reference.weights.items():
        want = np.asarray(want, np.float32)
        got = ckpt.weights[key]
        if want.ndim == 1:  # norms stay F32 in a GGUF: exact
            assert np.array_equal(got, want), key
            continue
        # Q8_0: blocks of 32 along a row share d = max|x| / 127 (an f16); each value is d * round(x / d),
        # off by at most d/2 (plus f16 rounding of d), then rounded to bf16 by the importer.
        blocks = want.reshape(-1, 32)
        d = np.abs(blocks).max(axis=1, keepdims=True) / 127
        bound = d * (0.5 + 127 * 2**-11) + np.abs(blocks) * 2**-8
        error = np.abs(got.reshape(-1, 32) - blocks)
        assert np.all(error <= bound * (1 + 1e-6)), f"{key}: max error {error.max():.3g} over its bound"
        assert error.max() > 0, f"{key}: Q8_0 should not be lossless on random weights"


def test_imported_tokenizer_follows_the_gguf(imported):
    f32 = json.loads((imported["gguf_f32.gguf"] / "tokenizer.json").read_text())
    q8 = json.loads((imported["gguf_q8_0.gguf"] / "tokenizer.json").read_text())
    assert f32["pre_tokenizer"] == {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": gguf_import.LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    assert q8["pre_tokenizer"] == {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    assert f32["model"]["ignore_merges"] and not q8["model"]["ignore_merges"]
    vocab = f32["model"]["vocab"]
    assert len(vocab) == 128 and vocab["Ġ"] == 32 and vocab["h"] == 104 and vocab["he"] == 112
    assert f32["model"]["merges"][:2] == [["h", "e"], ["i", "n"]]
    assert [(t["id"], t["content"], t["special"]) for t in f32["added_tokens"]][:2] == \
        [(120, "<|begin_of_text|>", True), (121, "<|end_of_text|>", True)]
    assert len(f32["added_tokens"]) == 8
    # add_bos_token is true in the F32 file: the post-processor prepends <|begin_of_text|>.
    template = f32["post_processor"]["processors"][1]
    assert template["single"][0] == {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
    assert template["special_tokens"]["<|begin_of_text|>"]["ids"] == [120]
    assert q8["post_processor"]["type"] == "ByteLevel"
    config = json.loads((imported["gguf_f32.gguf"] / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == \
        ("<|begin_of_text|>", "<|eot_id|>", True)
    assert config["chat_template"].startswith("{% for m in messages %}")
    assert json.loads((imported["gguf_f32.gguf"] / "config.json").read_text())["eos_token_id"] == 124
    record = json.loads((imported["gguf_q8_0.gguf"] / gguf_import.IMPORT_RECORD).read_text())
    assert record["tensor_types"] == {"F32": 6, "Q8_0": 16} and record["source"] == "gguf_q8_0.gguf"
    assert record["sha256"] == gguf_import.sha256_of(FIXTURES / "gguf_q8_0.gguf")
