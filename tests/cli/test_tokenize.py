"""`llama3-np tokenize`: the ids equal the tokenizer tests' references (Meta's tokenizer for Llama 3,
llama.cpp for the default model) and the pieces' bytes concatenate to the input."""

import functools
import json

import pytest

import llama3_np.cli.tokenize
from llama3_np.load import load_tokenizer
from llama3_np.assets import default_model, llama3_tokenizer_path
from llama3_np.cli import main
from tests.text.test_tokenizer_assets import corpus, fixture

MODELS = {"llama3": (lambda: llama3_tokenizer_path().parent, "llama3_reference.json"),
          "default": (default_model, "default_reference.json")}


def _tokenize(capsys, *argv) -> tuple[int, str, str]:
    code = main(["tokenize", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no UTF-8 bytes to concatenate to
        return False
    return True


@pytest.mark.parametrize("name", MODELS)
def test_ids_are_the_references_and_pieces_concatenate_to_the_input(capsys, monkeypatch, name):
    folder, reference = MODELS[name]
    # The command loads the tokenizer on every run; once is enough for the whole corpus.
    load = functools.cache(load_tokenizer)
    monkeypatch.setattr(llama3_np.cli.tokenize, "load_tokenizer", load)
    lacking = {bytes([b]) for b in range(256)} - set(load(folder()).vocab)  # bytes encode() drops
    texts, want = corpus(), fixture(reference)["corpus"]
    checked = 0
    for text, ids in zip(texts, want):
        if not text or not _encodable(text) or any(bytes([b]) in lacking for b in text.encode()):
            continue
        code, out, err = _tokenize(capsys, "-m", str(folder()), f"--prompt={text}", "--no-bos", "--json")
        assert code == 0, err
        got = json.loads(out)
        assert got["ids"] == ids, f"{text!r}: {got['ids']} != reference {ids}"
        assert [p["id"] for p in got["pieces"]] == ids
        assert b"".join(bytes.fromhex(p["bytes"]) for p in got["pieces"]) == text.encode("utf-8"), text
        checked += 1
    assert checked >= len(texts) - 10, f"only {checked} of {len(texts)} corpus strings checked"


def test_lines_show_id_and_readable_piece_and_the_bos_the_model_adds(capsys, tmp_path):
    folder = llama3_tokenizer_path().parent
    code, out, _ = _tokenize(capsys, "-m", str(folder), "-p", "héllo €\n")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "128000 -> '<|begin_of_text|>'"  # Llama 3 adds BOS
    ids = [int(line.split(" -> ")[0]) for line in lines[1:]]
    assert ids == load_tokenizer(folder).encode("héllo €\n", bos=False)
    assert lines[-1].endswith("-> '\\n'")  # control characters escaped: one token, one line


def test_a_character_split_across_tokens_shows_its_bytes(capsys):
    # A rare CJK character is several byte-level tokens; each shows the bytes it holds.
    code, out, _ = _tokenize(capsys, "-m", str(default_model()), "-p", "𝔘", "--json")
    pieces = json.loads(out)["pieces"]
    assert code == 0 and len(pieces) > 1
    assert any("\\x" in p["piece"] for p in pieces)
    assert b"".join(bytes.fromhex(p["bytes"]) for p in pieces) == "𝔘".encode()


def test_file_input_and_bad_input(capsys, tmp_path):
    (tmp_path / "t.txt").write_bytes(b"\xef\xbb\xbfhello")
    code, out, _ = _tokenize(capsys, "-m", str(default_model()), "-f", str(tmp_path / "t.txt"), "--json")
    code2, out2, _ = _tokenize(capsys, "-m", str(default_model()), "-p", "hello", "--json")
    assert code == code2 == 0 and json.loads(out) == json.loads(out2)  # the byte-order mark is dropped
    code, out, err = _tokenize(capsys, "-m", str(default_model()))
    assert (code, out, err) == (2, "", "llama3-np: error: give a text: -p TEXT or -f FILE\n")
    (tmp_path / "bad.txt").write_bytes(b"\xff")
    code, out, err = _tokenize(capsys, "-m", str(default_model()), "-f", str(tmp_path / "bad.txt"), "--json")
    assert code == 2 and out == "" and "is not UTF-8 text" in err and err.count("\n") == 1
