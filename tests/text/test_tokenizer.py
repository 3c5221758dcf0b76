"""Tokenizer ids against the references: Meta's Llama 3 tokenizer and llama.cpp on the default model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3_np.errors import Llama3Error
from llama3_np.text.tokenizer import (LLAMA3_PATTERN, StreamDecoder, Tokenizer, _meta_chunks, load_tokenizer,
                                 read_tiktoken_file)
from tests.text.test_tokenizer_assets import (TOKENIZERS, corpus, first_difference, fixture, ids_sha256, llama3,
                                   long_text)

REFERENCE = {"llama3": "llama3_reference.json", "default": "default_reference.json"}


def test_metas_published_example():
    ids = llama3().encode("This is a test sentence.", bos=True, eos=True)
    assert ids == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert ids == fixture("llama3_reference.json")["example"]


def test_llama3_special_tokens_are_metas():
    tok, ref = llama3(), fixture("llama3_reference.json")
    assert tok.special_tokens == ref["special_tokens"]
    assert (tok.bos_id, tok.eos_id, tok.n_vocab, tok.add_bos) == (128000, 128001, 128256, True)
    named = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|finetune_right_pad_id|>": 128004,
             "<|step_id|>": 128005, "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
             "<|eom_id|>": 128008, "<|eot_id|>": 128009, "<|python_tag|>": 128010, "<|image|>": 128011,
             "<|reserved_special_token_245|>": 128255}
    assert {name: tok.encode_special(name) for name in named} == named
    assert tok.special_ids == frozenset(range(128000, 128256))


def test_default_tokenizer_is_smollm2s():
    tok = TOKENIZERS["default"]()
    assert tok.n_vocab == 49152 and tok.special_ids == frozenset(range(17))
    assert (tok.special_tokens["<|im_start|>"], tok.special_tokens["<|im_end|>"], tok.eos_id) == (1, 2, 2)
    assert tok.add_bos is False and tok.encode("Hi") == tok.encode("Hi", bos=False)


@pytest.mark.parametrize("which", ["llama3", "default"])
def test_corpus_equals_reference(which):
    tok, ref = TOKENIZERS[which](), fixture(REFERENCE[which])
    wrong = [f"{text!r}: {first_difference(tok.encode(text, bos=False), want)}"
             for text, want in zip(corpus(), ref["corpus"]) if tok.encode(text, bos=False) != want]
    assert not wrong, f"{len(wrong)} of {len(corpus())} strings differ from {ref['producer']}:\n" + "\n".join(wrong)


@pytest.mark.parametrize("case", range(len(fixture("corpus.json")["long"])),
                         ids=[c["name"] for c in fixture("corpus.json")["long"]])
@pytest.mark.parametrize("which", ["llama3", "default"])
def test_long_inputs_equal_reference(which, case):
    spec, want = fixture("corpus.json")["long"][case], fixture(REFERENCE[which])["long"][case]
    ids = TOKENIZERS[which]().encode(long_text(spec), bos=False)
    assert (len(ids), ids_sha256(ids)) == (want["count"], want["sha256"]), (
        f"{spec['name']}: {len(ids)} ids, expected {want['count']}; head {ids[:16]} vs {want['head']}, "
        f"tail {ids[-16:]} vs {want['tail']}")


def test_metas_chunking_changes_ids_on_long_runs():
    """The chunk cuts matter: without them 100k spaces would not give Meta's ids."""
    tok, text = llama3(), " " * 100_000
    assert tok._encoding.encode_ordinary(text) != tok.encode(text, bos=False)


@settings(max_examples=300, deadline=None)
@given(st.text(st.sampled_from(" a\n\t\u3000\x1c.é"), max_size=40), st.integers(1, 12), st.integers(1, 5))
def test_meta_chunks_are_metas_cuts(text, max_chunk, max_run):
    """`_meta_chunks` against a line-by-line restatement of Meta's `_split_whitespaces_or_nonwhitespaces`."""
    want = []
    for start in range(0, len(text), max_chunk):
        s = text[start:start + max_chunk]
        run, is_space, begin = 0, s[0].isspace(), 0
        for i, c in enumerate(s):
            if is_space ^ c.isspace():
                run, is_space = 1, c.isspace()
            else:
                run += 1
                if run > max_run:
                    want.append(s[begin:i])
                    begin, run = i, 1
        want.append(s[begin:])
    assert list(_meta_chunks(text, max_chunk, max_run)) == want


# -- special tokens never come from text ------------------------------------------------------------

@pytest.mark.parametrize("which", ["llama3", "default"])
def test_special_token_text_is_plain_text(which):
    tok = TOKENIZERS[which]()
    texts = [*tok.special_tokens, "".join(tok.special_tokens), *corpus()]
    leaked = {t: sorted(set(tok.encode(t, bos=False)) & tok.special_ids) for t in texts}
    assert not any(leaked.values()), {t: ids for t, ids in leaked.items() if ids}
    for name in tok.special_tokens:
        assert tok.decode(tok.encode(name, bos=False)) == name


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                                           "<|end_header_id|>", "<|reserved_special_token_9|>",
                                           "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|", "|>"]),
                          st.text(max_size=5)), max_size=8))
def test_no_text_yields_special_ids(parts):
    text = "".join(parts)
    for which in ("llama3", "default"):
        tok = TOKENIZERS[which]()
        assert not set(tok.encode(text, bos=False)) & tok.special_ids, (which, text)


# -- decoding -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["llama3", "default"])
def test_decode_inverts_encode(which):
    """Text comes back, except the bytes the vocabulary has no token for (only the default model
    lacks some), which are dropped; a lone surrogate is read as U+FFFD."""
    tok = TOKENIZERS[which]()
    for text in corpus():
        plain = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")
        spelled = bytes(b for b in plain if bytes([b]) in tok.vocab)
        assert b"".join(map(tok.token_bytes, tok.encode(text, bos=False))) == spelled, text
        if spelled == plain:
            assert tok.decode(tok.encode(text, bos=False)) == plain.decode("utf-8"), text


def test_bos_and_eos():
    tok = llama3()
    assert tok.encode("x") == [tok.bos_id, 87] == tok.encode("x", bos=True)
    assert tok.encode("x", bos=False, eos=True) == [87, tok.eos_id]
    assert tok.encode("", bos=False) == [] and tok.decode([]) == ""


def test_token_bytes_and_bad_ids():
    tok = llama3()
    assert tok.token_bytes(2028) == b"This" and tok.token_bytes(128009) == b"<|eot_id|>"
    for bad in (-1, 128256, 10**9, "7", None):
        with pytest.raises(Llama3Error, match="not in the vocabulary"):
            tok.decode([bad])
        with pytest.raises(Llama3Error, match="not in the vocabulary"):
            StreamDecoder(tok).push(bad)
    with pytest.raises(Llama3Error, match="no special token"):
        tok.encode_special("<|im_start|>")


# -- loading --------------------------------------------------------------------------------------------

def test_load_tokenizer_finds_the_file(tmp_path):
    source = llama3().name
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "tokenizer.model").write_bytes(Path(source).read_bytes())
    assert load_tokenizer(tmp_path).special_tokens == llama3().special_tokens
    assert load_tokenizer(tmp_path / "original" / "tokenizer.model").n_vocab == 128256


@pytest.mark.parametrize("content, message", [
    (b"\x0a\x0b\x80\xff binary", "not a tiktoken BPE file"),
    (b"IQ== 0\nIg== 1 extra\n", r":2: not a tiktoken BPE line"),
    (b"IQ== 0\n!!!! 1\n", r":2: not a tiktoken BPE line"),
    (b"IQ== 0\nIg== 5\n", "ranks are not 0..N-1"),
    (b"", "ranks are not 0..N-1"),
])
def test_damaged_tokenizer_model_is_a_user_error(tmp_path, content, message):
    (tmp_path / "tokenizer.model").write_bytes(content)
    with pytest.raises(Llama3Error, match=message) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.model") in str(e.value)


def test_missing_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(Llama3Error, match="no tokenizer found"):
        load_tokenizer(tmp_path)
    with pytest.raises(Llama3Error, match="no such checkpoint directory"):
        load_tokenizer(tmp_path / "nowhere")


def _default_json() -> dict:
    """The default model's tokenizer.json, as its GGUF's metadata gives it (what import-gguf writes)."""
    from llama3_np.assets import cached_default_gguf
    from llama3_np.formats.gguf_import import tokenizer_objects

    return json.loads(json.dumps(tokenizer_objects(cached_default_gguf())[0]))


@pytest.mark.parametrize("damage, message", [
    (lambda tj: "{ truncated", "not valid JSON"),
    (lambda tj: tj | {"model": {"type": "Unigram", "vocab": []}}, "not a BPE tokenizer"),
    (lambda tj: tj | {"normalizer": {"type": "NFC"}}, "normalizer 'NFC'"),
    (lambda tj: tj | {"pre_tokenizer": {"type": "Whitespace"}}, "not supported"),
    (lambda tj: tj | {"pre_tokenizer": {"type": "Digits", "individual_digits": True}}, "no ByteLevel step"),
    (lambda tj: tj | {"model": tj["model"] | {"vocab": tj["model"]["vocab"] | {"a b": 5}}}, "byte-level alphabet"),
    (lambda tj: tj | {"model": tj["model"] | {"merges": tj["model"]["merges"][::-1]}}, "in id order"),
    (lambda tj: tj | {"added_tokens": [{"id": 7, "content": "<x>", "special": False, "lstrip": True}]},
     "has lstrip set"),
])
def test_damaged_tokenizer_json_is_a_user_error(tmp_path, damage, message):
    tj = damage(_default_json())
    (tmp_path / "tokenizer.json").write_text(tj if isinstance(tj, str) else json.dumps(tj))
    with pytest.raises(Llama3Error, match=message) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(e.value)


def test_older_merge_spelling_reads_the_same(tmp_path):
    """tokenizers before 0.20 wrote each merge as one string "a b" instead of a pair."""
    tj = _default_json()
    tj["model"]["merges"] = [" ".join(pair) for pair in tj["model"]["merges"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    older, default = load_tokenizer(tmp_path), TOKENIZERS["default"]()
    assert older.merges == default.merges
    assert [older.encode(t) for t in corpus()] == fixture("default_reference.json")["corpus"]


def test_tiktoken_file_ranks_round_trip():
    vocab = read_tiktoken_file(Path(llama3().name))
    assert len(vocab) == 128000 and vocab[b"This"] == 2028
    assert all(bytes([b]) in vocab for b in range(256))


# -- the Hugging Face layout of Llama 3's tokenizer ---------------------------------------------------------

def _llama3_as_hf_json(path):
    """Llama 3's tokenizer written the way Hugging Face ships it (`tokenizer.json`, transformers'
    TikTokenConverter): byte-level strings, every two-token split of a token as a merge, ordered
    by the rank of the token it makes, `ignore_merges`, and a Split + ByteLevel pre-tokenizer."""
    from llama3_np.text.tokenizer import _byte_decoder
    tok = llama3()
    to_char = {b: c for c, b in _byte_decoder().items()}
    spell = lambda t: "".join(to_char[b] for b in t)  # noqa: E731
    merges = []
    for token, rank in tok.vocab.items():
        splits = [(token[:k], token[k:]) for k in range(1, len(token))
                  if token[:k] in tok.vocab and token[k:] in tok.vocab]
        merges += [(rank, tok.vocab[a], tok.vocab[b], [spell(a), spell(b)]) for a, b in splits]
    merges.sort()
    tj = {"added_tokens": [{"id": i, "content": s, "special": True} for s, i in tok.special_tokens.items()],
          "normalizer": None,
          "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
              {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
              {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
          "post_processor": {"type": "Sequence", "processors": [
              {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
              {"type": "TemplateProcessing", "single": [
                  {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]}]},
          "decoder": {"type": "ByteLevel"},
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "byte_fallback": False, "ignore_merges": True,
                    "vocab": {spell(t): i for t, i in tok.vocab.items()}, "merges": [m[-1] for m in merges]}}
    path.write_text(json.dumps(tj))
    return path


def test_llama3_from_hf_json_equals_meta(tmp_path):
    hf = Tokenizer.from_hf_json(_llama3_as_hf_json(tmp_path / "tokenizer.json"))
    assert (hf.bos_id, hf.eos_id, hf.add_bos, hf.special_tokens) == (128000, None, True, llama3().special_tokens)
    assert hf.patterns == [LLAMA3_PATTERN] and hf.whole_first
    ref = fixture("llama3_reference.json")
    assert hf.encode("This is a test sentence.", eos=False) == ref["example"][:-1]
    wrong = [text for text, want in zip(corpus(), ref["corpus"]) if hf.encode(text, bos=False) != want]
    assert not wrong, wrong
