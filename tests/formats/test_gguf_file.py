"""llama3_np.formats.gguf_file: a GGUF read as it is agrees with the gguf package's reader
(metadata, tensor names, types, shapes, bytes), the default model's real tensors dequantize
bit-equal to `gguf.quants.dequantize`, and every kind of broken or foreign file is refused in one
line that says what it is, with nothing written to the cache."""

import io
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from llama3_np import Llama3Error, assets
from llama3_np.cli import main
from llama3_np.formats.ggml_blocks import SUPPORTED
from llama3_np.formats.gguf_file import GGUFFile

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints" / "gguf_q8_0.gguf"


def test_metadata_and_tensors_agree_with_the_gguf_package_reader():
    ours, theirs = GGUFFile(FIXTURE), gguf.GGUFReader(FIXTURE)
    for key, field in theirs.fields.items():
        if not key.startswith("GGUF."):
            assert ours.metadata[key] == pytest.approx(field.contents()), key
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert (mine.type.id, mine.shape) == (int(t.tensor_type), tuple(int(d) for d in reversed(t.shape)))
        assert np.array_equal(mine.raw().reshape(-1), np.asarray(t.data).reshape(-1).view(np.uint8))


def test_default_model_tensors_dequantize_bit_equal_to_gguf():
    """Every tensor of the default model's file (Q8_0 embeddings, Q4_1 matrices, F32 norms)."""
    f = GGUFFile(assets.default_model())
    assert {t.type.name for t in f.tensors.values()} == {"Q8_0", "Q4_1", "F32"}
    for t in f.tensors.values():
        reference = gguf.quants.dequantize(t.raw(), gguf.GGMLQuantizationType(t.type.id)).reshape(t.shape)
        assert np.array_equal(t.values().view(np.uint32), np.asarray(reference, np.float32).view(np.uint32)), t.name


# --- broken and foreign files ------------------------------------------------------------------

def _entry(data: bytes, name: str) -> int:
    """Where tensor `name`'s header entry continues after its name (at n_dims)."""
    key = struct.pack("<Q", len(name)) + name.encode()
    return data.index(key) + len(key)


def _patched(data: bytes, name: str, field: str, value: int) -> bytes:
    i = _entry(data, name)
    n_dims = struct.unpack_from("<I", data, i)[0]
    at, fmt = {"ne0": (i + 4, "<Q"), "type": (i + 4 + 8 * n_dims, "<I"), "offset": (i + 8 + 8 * n_dims, "<Q")}[field]
    out = bytearray(data)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


def _offset(data: bytes, name: str) -> int:
    i = _entry(data, name)
    n_dims = struct.unpack_from("<I", data, i)[0]
    return struct.unpack_from("<Q", data, i + 8 + 8 * n_dims)[0]


GOOD = FIXTURE.read_bytes()
Q = "blk.0.attn_q.weight"
CASES = {
    "empty": (b"", "not a GGUF file (it is empty: 0 bytes); download it again"),
    "html": (b"<!DOCTYPE html>\n<html><head><title>Sign in</title>",
             "not a GGUF file (it is an HTML page, not a model: the download failed or needed a login)"),
    "lfs": (b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 4920000000\n",
            "not a GGUF file (it is a git-lfs pointer"),
    "other": (b"PK\x03\x04" + bytes(40), "not a GGUF file (it starts with b'PK\\x03\\x04"),
    "version 1": (GOOD[:4] + struct.pack("<I", 1) + GOOD[8:], "GGUF version 1; llama3_np reads versions 2 and 3"),
    "metadata cut": (GOOD[:500], "the file is truncated: it ends at byte 500, inside metadata key "
                                 "'tokenizer.ggml.model'; download it again"),
    "array cut": (GOOD[:1000], "the file is truncated or corrupt: the header announces 128 items in metadata key "
                               "'tokenizer.ggml.tokens', more than its remaining 399 bytes could hold"),
    "tensor list cut": (GOOD[:3500], "the file is truncated: it ends at byte 3500, inside the entry of tensor "
                                     "'blk.0.ffn_norm.weight'"),
    "data cut": (GOOD[:20000], "the file is truncated: tensor 'blk.1.attn_k.weight' (Q8_0, shape (16, 32)) needs "
                               "bytes 19712 to 20256, but the file has 20000; download it again"),
    "huge count": (GOOD[:16] + struct.pack("<Q", 1 << 40) + GOOD[24:],
                   "the header announces 1099511627776 metadata entries"),
    "misaligned": (_patched(GOOD, Q, "offset", _offset(GOOD, Q) + 2),
                   f"tensor {Q!r} starts at offset {_offset(GOOD, Q) + 2} of the data section, not a multiple of "
                   "the alignment 32"),
    "overlap": (_patched(GOOD, Q, "offset", _offset(GOOD, "token_embd.weight") + 32),
                "the file is corrupt: tensors 'token_embd.weight' and 'blk.0.attn_q.weight' overlap"),
    "partial block": (_patched(GOOD, Q, "ne0", 48),
                      f"tensor {Q!r} has rows of 48 values, not a whole number of Q8_0 blocks of 32"),
    "offset past the end": (_patched(GOOD, Q, "offset", 1 << 40),
                            f"the file is truncated: tensor {Q!r} (Q8_0, shape (32, 32)) needs bytes "),
    "unknown type": (_patched(GOOD, Q, "type", 200),
                     f"tensor {Q!r} is stored as unknown type 200, which llama3_np does not read"),
    "unsupported": (_patched(GOOD, Q, "type", 11),
                    f"tensor {Q!r} is stored as Q3_K, which llama3_np does not read; it reads "
                    + ", ".join(t.name for t in SUPPORTED.values())),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_broken_or_foreign_file_is_named_in_one_line_and_nothing_is_cached(case, tmp_path, monkeypatch, capsys):
    data, message = CASES[case]
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    with pytest.raises(Llama3Error) as e:
        GGUFFile(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)
    monkeypatch.setenv("LLAMA3_NP_CACHE", str(tmp_path / "cache"))
    for command in (["generate", "-p", "hi", "-n", "1", "-m", str(path)],
                    ["generate", "--tokens", "1", "-n", "1", "--dtype", "gguf", "-m", str(path)],
                    ["inspect", "-m", str(path)], ["tokenize", "-p", "hi", "-m", str(path)],
                    ["import-gguf", str(path), str(tmp_path / "out")]):
        assert main(command) == 2, command
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and err.startswith(f"llama3-np: error: {path}: ") and message in err, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()  # nothing half-written


def test_a_gguf_without_tokenizer_pre_is_read_as_llama3_when_the_vocabulary_is(tmp_path, capsys):
    """GGUFs converted before llama.cpp wrote tokenizer.ggml.pre (spring 2024): llama.cpp still loads
    them; a Llama 3 vocabulary (its special tokens where Llama 3 has them) gets Llama 3's pre-tokenizer."""
    from llama3_np.formats.gguf_import import pre_tokenizer_name, _Fields

    path = tmp_path / "old.gguf"
    w = gguf.GGUFWriter(path, "llama")
    tokens = [f"t{i}" for i in range(128000)] + ["<|begin_of_text|>", "<|end_of_text|>"]
    w.add_token_list(tokens)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    f = GGUFFile(path)
    assert pre_tokenizer_name(path, _Fields(path, f)) == "llama-bpe"
    assert capsys.readouterr().err == (f"llama3-np: note: {path}: no tokenizer.ggml.pre (a GGUF made before "
                                       "llama.cpp recorded it); the vocabulary is Llama 3's, so its pre-tokenizer "
                                       "(llama-bpe) is used\n")
    f.metadata["tokenizer.ggml.tokens"] = tokens[:100]
    with pytest.raises(Llama3Error, match="no tokenizer.ggml.pre and the vocabulary is not Llama 3's"):
        pre_tokenizer_name(path, _Fields(path, f))


def test_inspect_and_tokenize_read_the_metadata_only(tmp_path, monkeypatch, capsys):
    """No tensor's bytes are touched (every read of them goes through GGUFTensor.raw), and nothing
    is written."""
    from llama3_np.formats.gguf_file import GGUFTensor

    def refuse(self):
        raise AssertionError(f"tensor {self.name} was read")

    path = assets.default_model()
    monkeypatch.setattr(GGUFTensor, "raw", refuse)
    monkeypatch.setenv("LLAMA3_NP_CACHE", str(tmp_path / "cache"))
    assert main(["tokenize", "-m", str(path), "-p", "The three primary colors are", "--json"]) == 0
    assert '"ids": [504, 1296, 3003, 4683, 359]' in capsys.readouterr().out
    assert main(["inspect", "-m", str(path)]) == 0
    assert "format:      GGUF" in capsys.readouterr().out
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("command", [
    ["generate", "-p", "hi"], ["chat"], ["inspect"], ["tokenize", "-p", "hi"], ["trace", "-p", "hi"],
    ["dump", "-p", "hi", "-o", "OUT/dump.safetensors"], ["walkthrough", "-p", "hi", "-o", "OUT/page.html"],
    ["perplexity", "-f", "TEXT"], ["score", "-p", "hi"], ["bench"], ["train", "-f", "TEXT", "-o", "OUT/adapter"],
], ids=lambda c: c[0])
def test_every_command_that_takes_m_names_a_foreign_file_in_one_line(command, tmp_path, monkeypatch, capsys):
    """An HTML page saved as model.gguf, given to each command that reads a model: the same one line,
    exit 2, before anything is written (the cache, the command's output)."""
    path = tmp_path / "model.gguf"
    path.write_bytes(CASES["html"][0])
    (tmp_path / "text.txt").write_text("Hello world.\n")
    monkeypatch.setenv("LLAMA3_NP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    argv = [str(tmp_path / a[4:]) if a.startswith("OUT/") else str(tmp_path / "text.txt") if a == "TEXT" else a
            for a in command]
    assert main([*argv, "-m", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"llama3-np: error: {path}: {CASES['html'][1]}; download it again\n", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "text.txt"]  # nothing written
