"""Non-special added tokens (Hugging Face `"special": false`, a GGUF's USER_DEFINED tokens) are
found in the text and the rest goes through BPE: ids equal Hugging Face `tokenizers`' and
llama.cpp's on the committed strings, for a Hugging Face folder and a GGUF
(tests/fixtures/tokenizer/added/, `tools/make_added_token_fixtures.py`)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from llama3_np.formats.gguf_to_hf import import_gguf
from llama3_np.text.tokenizer import load_tokenizer
from tests.text.test_tokenizer_assets import first_difference

ADDED = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizer" / "added"


@functools.cache
def reference() -> dict:
    return json.loads((ADDED / "reference.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module", params=["hf", "gguf"])
def tok(request, tmp_path_factory):
    if request.param == "hf":
        return load_tokenizer(ADDED / "hf")
    return load_tokenizer(import_gguf(ADDED / "added.gguf", tmp_path_factory.mktemp("added") / "out"))


def test_the_fixture_has_non_special_added_tokens(tok):
    assert {"<think>", "</think>", "<tool_call>", "<tool", "call me", "Ünïcødé"} <= set(tok.added_tokens)
    assert "<|eot_id|>" in tok.special_tokens and "<|eot_id|>" not in tok.added_tokens


def test_added_tokens_are_matched_as_llama_cpp_matches_them(tok):
    """llama.cpp without parse_special: user-defined tokens matched, control tokens' text left as text."""
    ref = reference()
    for s, want in zip(ref["strings"], ref["llama.cpp"]):
        got = tok.encode(s, bos=False)
        assert got == want, f"{s!r}: {first_difference(got, want)} ({ref['producer']})"
        assert tok.decode(got) == s


def test_with_special_tokens_split_out_ids_equal_tokenizers_and_llama_cpp(tok):
    """A rendered chat template is cut at special tokens first (`split_special`), as `tokenizers`
    (add_special_tokens=False) and llama.cpp (parse_special) read every added token in a text."""
    ref = reference()
    for s, hf, cpp in zip(ref["strings"], ref["tokenizers"], ref["llama.cpp special"]):
        got = [i for piece, special in tok.split_special(s)
               for i in ([special] if special is not None else tok.encode(piece, bos=False))]
        assert got == hf == cpp, f"{s!r}: {first_difference(got, hf)} ({ref['producer']})"
