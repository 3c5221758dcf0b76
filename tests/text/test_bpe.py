"""The pure-Python BPE (`llama3_np.text.bpe`, the readable specification) equals the tiktoken path."""

from __future__ import annotations

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3_np.text import bpe
from llama3_np.text.tokenizer import GPT2_PATTERN
from tests.text.test_tokenizer_assets import TOKENIZERS, corpus, fixture

# Characters that sit on the edges of the split patterns: apostrophes and contraction letters,
# digits of several scripts, whitespace of several kinds, joiners, combining marks, emoji, CJK,
# control characters and bytes some vocabularies lack.
EDGES = list(" \t\n\r\x0b\x0c\x1c\u00a0\u3000\u2028'’sStTrReEvVmMlLdD1234567890٣½²x.,!?-_()\"#@"
             "é\u0301\u200d\u200b\ufe0f🙂👩🏽🇫漢字かカ한Ωж\x00\x04\x7f\ufffd\U00040000")


def spec_encode(tok, text):
    return bpe.encode(text, tok.vocab, tok.patterns, tok.merges, tok.whole_first)


@pytest.mark.parametrize("which", ["llama3", "default"])
def test_spec_equals_reference_on_corpus(which):
    tok = TOKENIZERS[which]()
    ref = fixture({"llama3": "llama3_reference.json", "default": "default_reference.json"}[which])["corpus"]
    wrong = [text for text, want in zip(corpus(), ref) if spec_encode(tok, text) != want]
    assert not wrong, f"the BPE specification differs from the reference on {wrong}"


# The character classes (\p{L}, \p{N}, \s) come from the `regex` module here and from tiktoken's
# compiled regex there, which may follow different Unicode versions: random text keeps to
# characters this Python's Unicode tables assign (Unicode 14 on 3.11); all versions agree on those.
ASSIGNED = st.characters(exclude_categories=("Cs", "Cn"))


@pytest.mark.parametrize("which", ["llama3", "default"])
@settings(max_examples=150, deadline=None)
@given(text=st.text(ASSIGNED, max_size=40) | st.text(st.sampled_from(EDGES), max_size=60))
def test_spec_equals_tiktoken_on_random_text(which, text):
    tok = TOKENIZERS[which]()
    assert spec_encode(tok, text) == tok.encode(text, bos=False)


def test_stages_are_not_one_pattern():
    """SmolLM2 splits digits before the GPT-2 pattern; folding both into one pattern is not the same."""
    assert bpe.pretokenize("  1", [r"\p{N}", GPT2_PATTERN]) == ["  ", "1"]
    assert regex.findall(r"\p{N}|" + GPT2_PATTERN, "  1") == [" ", " 1"]
    tok = TOKENIZERS["default"]()
    assert tok.patterns == [r"\p{N}", GPT2_PATTERN]
    assert tok.encode("  1") == [tok.vocab[b"  "], tok.vocab[b"1"]]


def test_isolate_keeps_matches_and_gaps():
    assert bpe.isolate("ab12c3", r"\p{N}") == ["ab", "1", "2", "c", "3"]
    assert bpe.isolate("ab12c3", r"\p{N}+") == ["ab", "12", "c", "3"]
    assert bpe.isolate("", r"\p{N}") == [] and bpe.isolate("abc", r"\p{N}") == ["abc"]


def test_merge_takes_the_lowest_ranked_pair_first():
    vocab = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5}
    # tiktoken rules: a pair's rank is its joined token's; "ab" (3) before "bc" (4), then "abc".
    assert bpe.merge(b"abc", vocab, None, whole_first=False) == [b"abc"]
    assert bpe.merge(b"abcb", vocab, None, whole_first=False) == [b"abc", b"b"]
    # merge-list rules: only listed pairs join; ("a", "bc") is not listed, so "bc" stays apart.
    merges = {(b"b", b"c"): 0, (b"a", b"b"): 1, (b"ab", b"c"): 2}
    assert bpe.merge(b"abc", vocab, merges, whole_first=False) == [b"a", b"bc"]
    assert bpe.merge(b"abc", vocab, merges, whole_first=True) == [b"abc"]
    # the leftmost of equal pairs joins first
    assert bpe.merge(b"aaa", {b"a": 0, b"aa": 1}, None, whole_first=False) == [b"aa", b"a"]


def test_bytes_without_a_token_are_dropped():
    vocab = {b"a": 0, b"b": 1, b"ab": 2}
    assert bpe.encode("a\x04b", vocab, [r"[\s\S]+"], None) == [0, 1]  # \x04 kept "a" and "b" apart
    assert bpe.encode("ab", vocab, [r"[\s\S]+"], None) == [2]


def test_default_vocabulary_is_safe_for_tiktoken():
    """tiktoken takes a piece that is a token whole, and joins any pair whose joined token exists;
    SmolLM2's file (`ignore_merges` false) only joins listed pairs. On this vocabulary the two
    agree wherever it matters most: every token's own bytes merge back into exactly that token,
    under either rule."""
    tok = TOKENIZERS["default"]()
    for rules in (tok.merges, None):
        wrong = [t for t in tok.vocab if bpe.merge(t, tok.vocab, rules, whole_first=False) != [t]]
        assert not wrong, f"{len(wrong)} tokens do not merge back into themselves, e.g. {wrong[:5]}"


# ---------------------------------------------------------------------------------------------
# Learning the merges


def test_learnt_merges_equal_hugging_face_bpe_trainer_and_load_as_a_tiktoken_encoding():
    """tests/fixtures/tokenizer/bpe_trainer.json: `tokenizers`' BpeTrainer on the Jargon File text
    (tools/make_bpe_trainer_fixture.py); the merges must be the same pairs in the same order."""
    import json
    from pathlib import Path

    import tiktoken

    from llama3_np.text.bpe import train

    root = Path(__file__).resolve().parents[1] / "fixtures"
    ref = json.loads((root / "tokenizer" / "bpe_trainer.json").read_text())
    alphabet = sorted(ref["alphabet_ids"], key=ref["alphabet_ids"].get)
    vocab, merges = train([(root / "xcheck" / ref["corpus"]).read_text(encoding="utf-8")], ref["vocab_size"],
                          [ref["pattern"]], ref["min_frequency"], [bytes.fromhex(b)[0] for b in alphabet])
    learnt = [[a.hex(), b.hex()] for a, b in merges]
    first = next((i for i, (x, y) in enumerate(zip(learnt, ref["merges"])) if x != y), None)
    assert learnt == ref["merges"], f"merge {first} differs: {learnt[first] if first is not None else ''} vs " \
                                    f"{ref['merges'][first] if first is not None else ''}"
    assert all(vocab[bytes.fromhex(b)] == i for b, i in ref["alphabet_ids"].items())
    encoding = tiktoken.Encoding("learnt", pat_str=ref["pattern"], mergeable_ranks=vocab, special_tokens={})
    assert encoding.encode(ref["sample"]) == ref["sample_ids"]
