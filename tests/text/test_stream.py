"""The streaming detokenizer: pieces add up to `decode`, and no piece splits a UTF-8 character."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from llama3_np.text.tokenizer import StreamDecoder
from tests.text.test_tokenizer_assets import TOKENIZERS, corpus, llama3


def stream(tok, ids):
    dec = StreamDecoder(tok)
    return [dec.push(i) for i in ids] + [dec.flush()]


@pytest.mark.parametrize("which", ["llama3", "default"])
def test_pieces_add_up_to_decode(which):
    tok = TOKENIZERS[which]()
    for text in corpus():
        ids = tok.encode(text, bos=False)
        pieces = stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids), text
        # Each piece is complete text: whatever decode makes of the whole, no piece adds a U+FFFD.
        assert sum(p.count("\ufffd") for p in pieces) == tok.decode(ids).count("\ufffd"), (text, pieces)


def test_a_character_split_over_tokens_waits_until_complete():
    tok = llama3()
    ids = tok.encode("🦙")  # with BOS; the emoji's four bytes are spread over several tokens
    assert len(ids) > 2 and all(len(tok.token_bytes(i)) < 4 for i in ids[1:])
    pieces = stream(tok, ids)
    assert pieces[:-2] == ["<|begin_of_text|>"] + [""] * (len(ids) - 2) and pieces[-2:] == ["🦙", ""]


def test_unfinished_character_becomes_replacement_only_at_the_end():
    tok = llama3()
    ids = tok.encode("🦙", bos=False)[:-1]
    assert stream(tok, ids) == [""] * len(ids) + ["\ufffd"]
    assert tok.decode(ids) == "\ufffd"


def test_bytes_that_can_never_be_utf8_come_out_at_once():
    tok = llama3()
    bad = next(i for i in range(256) if tok.token_bytes(i) == b"\xff")
    assert stream(tok, [bad, tok.encode("ok", bos=False)[0]]) == ["\ufffd", "ok", ""]
    # ED A1 would begin a surrogate, which UTF-8 forbids: two U+FFFD as soon as the A1 arrives
    # (Python's incremental decoder alone would hold both bytes until a third), as decode has them.
    ed, a1 = (next(i for i in range(256) if tok.token_bytes(i) == b) for b in (b"\xed", b"\xa1"))
    assert stream(tok, [ed, a1]) == ["", "\ufffd\ufffd", ""] and tok.decode([ed, a1]) == "\ufffd\ufffd"
    assert "".join(stream(tok, [ed, a1, ed])) == tok.decode([ed, a1, ed])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 128255), max_size=24))
@example([169, 94])  # bytes ED A1: a surrogate's start, which Python's decoder alone would hold back
def test_any_ids_stream_to_decode(ids):
    """Arbitrary ids (byte fragments, specials, invalid sequences): at every step, what was printed
    is final (a prefix of the text of all the ids) and at most one unfinished character is held back."""
    tok = llama3()
    for n in range(len(ids) + 1):
        *printed, held = stream(tok, ids[:n])
        assert "".join(printed) + held == tok.decode(ids[:n])
        assert tok.decode(ids).startswith("".join(printed))
        assert held in ("", "\ufffd")
