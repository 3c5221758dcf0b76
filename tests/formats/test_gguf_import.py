"""llama3_np.formats.gguf_import: every tensor type it must read comes out in NumPy's row-major shape (GGUF
lists dimensions the other way round), the folder `import-gguf` writes holds the exact values, and a
GGUF that is not a Llama 3 model is refused clearly."""

import json
import sys
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest

from tests.checkpoint_builders import random_weights
from llama3_np import Llama3Error

from llama3_np.cli import main
from llama3_np.formats import gguf_import, gguf_to_hf
from llama3_np.formats.gguf_file import GGUFFile

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import make_checkpoint_fixtures as fixtures  # noqa: E402  (its GGUF writer needs only gguf)

T = gguf.GGMLQuantizationType
ROWS, COLS = 3, 256  # one 256-value super-block per row for the K-quants


def _write_tensors(path, tensors):
    w = gguf.GGUFWriter(path, "llama")
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GGUFFile(path).tensors


def _block_bounds(x, qtype):  # [ROWS, COLS] -> max error each value may have, per 32-value block
    blocks = x.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    spread = blocks.max(axis=1, keepdims=True) - blocks.min(axis=1, keepdims=True)
    bound = {T.Q8_0: amax / 127 * 0.51, T.Q4_0: amax / 8 * 1.01, T.Q4_1: spread / 15 * 0.51}[qtype]
    return np.broadcast_to(bound, blocks.shape).reshape(x.shape)


def test_float_and_block_quantized_types_dequantize_in_numpy_shape(tmp_path):
    x = np.random.default_rng(0).standard_normal((ROWS, COLS)).astype(np.float32)
    x[1] *= 10  # rows of different scale: a transposed read would mix them up
    quantized = {T.Q8_0, T.Q4_0, T.Q4_1}
    tensors = {"f32": (x, None), "f16": (x.astype(np.float16), None),
               "bf16": (gguf.quants.quantize(x, T.BF16), T.BF16),
               **{t.name: (gguf.quants.quantize(x, t), t) for t in quantized}}
    stored = _write_tensors(tmp_path / "types.gguf", tensors)
    read = {name: t.values() for name, t in stored.items()}
    assert all(r.shape == (ROWS, COLS) and r.dtype == np.float32 for r in read.values())
    np.testing.assert_array_equal(read["f32"], x)
    np.testing.assert_array_equal(read["f16"], x.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(read["bf16"], x.astype(ml_dtypes.bfloat16).astype(np.float32))
    for qtype in quantized:
        error = np.abs(read[qtype.name] - x)
        assert np.all(error <= _block_bounds(x, qtype)), qtype.name
        assert 0 < error.max(), qtype.name


@pytest.mark.parametrize("qtype,scale_bytes", [(T.Q4_K, slice(0, 4)), (T.Q6_K, slice(208, 210))])
def test_k_quants_dequantize_row_by_row(tmp_path, qtype, scale_bytes):
    """The gguf package cannot quantize K-quants; build blocks by hand with sane f16 scales."""
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = np.random.default_rng(1).integers(0, 256, (ROWS, block_bytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes() * 2, np.uint8)
    raw[:, scale_bytes] = scale[: scale_bytes.stop - scale_bytes.start]
    raw[2] = raw[0]  # rows 0 and 2 hold the same block
    t = _write_tensors(tmp_path / "k.gguf", {"k": (raw, qtype)})["k"]
    values = t.values()
    assert values.shape == (ROWS, COLS) and np.all(np.isfinite(values))
    np.testing.assert_array_equal(values[0], values[2])
    assert not np.array_equal(values[0], values[1])
    np.testing.assert_array_equal(values, gguf.quants.dequantize(raw, qtype).reshape(ROWS, COLS))


def _gguf(tmp_path, **kwargs):
    config = fixtures.fixture_config()
    path = tmp_path / "m.gguf"
    fixtures.write_gguf(path, config, random_weights(config), T.F32, kwargs.pop("pre", "llama-bpe"), **kwargs)
    return path


def test_round_trip_recovers_the_rope_scaling_from_rope_freqs(tmp_path):
    index = gguf_import.scan_gguf(_gguf(tmp_path))
    assert index.config == fixtures.fixture_config()
    assert index.config.rope_scaling.factor == 8.0 and index.config.norm_eps == 1e-5


def test_llama3_rope_factors_match_llama_models_for_llama_3_1_8b():
    """freqs / apply_scaling(freqs) of llama-models 0.3.0 (llama3/model.py) for theta 500000, Dh 128."""
    from llama3_np.config import RopeScaling
    f = gguf_import.llama3_rope_factors(128, 500000.0, RopeScaling(8.0, 1.0, 4.0, 8192))
    assert f.shape == (64,) and f.dtype == np.float32
    assert np.all(f[:29] == 1) and np.all(f[35:] == 8)  # wavelength < 2048: unscaled; > 8192: factor 8
    np.testing.assert_allclose(f[29:35], [1.207484, 1.553415, 2.026313, 2.69453, 3.684253, 5.257327], rtol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    ({"pre": "qwen2"}, "tokenizer.ggml.pre is 'qwen2'; llama3_np knows smollm and Llama 3's (llama-bpe, llama3, llama-v3"),
    ({"arch": "gpt2"}, "general.architecture is 'gpt2'; llama3_np reads 'llama' models only"),
    ({"rope_freqs": np.full(4, 2.0, np.float32)}, "tensor 'rope_freqs.weight' is not Llama 3 rope scaling"),
])
def test_non_llama3_gguf_is_refused(tmp_path, kwargs, message):
    path = _gguf(tmp_path, **kwargs)
    with pytest.raises(Llama3Error) as e:
        gguf_to_hf.import_gguf(path, tmp_path / "out")
    assert str(path) in str(e.value) and message in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.parametrize("kwargs,message", [
    ({"pre": "qwen2"}, "tokenizer.ggml.pre is 'qwen2'"),
    ({"arch": "gpt2"}, "general.architecture is 'gpt2'; llama3_np reads 'llama' models only"),
    ({"rope_freqs": np.full(4, 2.0, np.float32)}, "tensor 'rope_freqs.weight' is not Llama 3 rope scaling"),
])
def test_non_llama3_gguf_given_to_m_is_one_line_exit_2_and_nothing_cached(tmp_path, monkeypatch, capsys,
                                                                          kwargs, message):
    path = _gguf(tmp_path, **kwargs)
    monkeypatch.setenv("LLAMA3_NP_CACHE", str(tmp_path / "cache"))
    for command in (["generate", "-p", "hi", "-n", "1"], ["generate", "--tokens", "1", "-n", "1", "--dtype", "gguf"]):
        assert main([*command, "-m", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"llama3-np: error: {path}: ") and message in err, err
    assert not (tmp_path / "cache").exists()


def test_import_refuses_to_overwrite_and_the_command_reports_one_line(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    assert main(["import-gguf", str(_gguf(tmp_path)), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"llama3-np: error: {tmp_path / 'out'}: exists and is not empty; " \
                                      "pass --force to replace it\n"
    assert main(["import-gguf", str(tmp_path / "m.gguf"), str(tmp_path / "out"), "--force"]) == 0
    assert not (tmp_path / "out" / "keep").exists() and (tmp_path / "out" / "model.safetensors").is_file()
    (tmp_path / "file").write_text("x")
    assert main(["import-gguf", str(tmp_path / "m.gguf"), str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err == f"llama3-np: error: {tmp_path / 'file'}: is a file; name a folder to import into\n"


# --- tokenizer metadata, read as llama.cpp reads it (src/llama-vocab.cpp, llama_vocab::impl::load) ---

def _imported_tokenizer(tmp_path, **kwargs):
    from llama3_np.load import load_tokenizer

    out = gguf_to_hf.import_gguf(_gguf(tmp_path, **kwargs), tmp_path / "out")
    return load_tokenizer(out), out


@pytest.mark.parametrize("pre,add_bos,expected", [
    ("llama-bpe", None, True),    # no key: llama.cpp's default for its Llama 3 pre-tokenizer adds BOS
    ("llama-bpe", False, False),  # the key decides when present
    ("llama-bpe", True, True),
    ("smollm", None, False),      # the other pre-tokenizers: no BOS unless the key says so
])
def test_add_bos_follows_the_key_else_llama_cpp_default_for_the_pre_tokenizer(tmp_path, pre, add_bos, expected):
    tok, _ = _imported_tokenizer(tmp_path, pre=pre, add_bos=add_bos)
    bos = tok.encode_special("<|begin_of_text|>")
    assert tok.add_bos is expected
    assert (tok.encode("hea")[:1] == [bos]) is expected


@pytest.mark.parametrize("pre", gguf_import.LLAMA3_PRE_NAMES)
def test_every_llama_cpp_spelling_of_the_llama3_pre_tokenizer_imports_as_llama_bpe(tmp_path, pre):
    tok, out = _imported_tokenizer(tmp_path, pre=pre, add_bos=None)
    (tmp_path / "ref").mkdir()
    reference, _ = _imported_tokenizer(tmp_path / "ref", pre="llama-bpe", add_bos=None)
    assert json.loads((out / "tokenizer.json").read_text())["pre_tokenizer"]["pretokenizers"][0]["pattern"] == \
        {"Regex": gguf_import.LLAMA3_PATTERN}
    text = "he said: 'I'M here' 12345\n\n"
    assert tok.add_bos and tok.encode(text) == reference.encode(text)


def test_end_of_generation_ids_found_in_the_vocabulary_are_written(tmp_path):
    """The metadata names only eos = <|eot_id|>; like llama.cpp's end-of-generation set, the imported
    folder lists <|end_of_text|> and <|eom_id|> as well, and a folder loads with all three."""
    from llama3_np.formats.checkpoint import load_checkpoint
    
    specials = fixtures.SPECIALS[:5] + ["<|eom_id|>"] + fixtures.SPECIALS[6:]
    tok, out = _imported_tokenizer(tmp_path, specials=specials)
    names = ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"]
    ids = [tok.encode_special(name) for name in names]
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == ids[0]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == ids
    assert load_checkpoint(out).eos_ids == tuple(ids)
    assert tok.end_of_generation_ids | set(load_checkpoint(out).eos_ids) == set(ids)
