"""Chat formats: dialogs encode to the references' ids, and user text never becomes a control token."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3_np.text.chat import CHATML, LLAMA3, chat_format_for, encode_dialog, encode_turn
from llama3_np.errors import Llama3Error
from llama3_np.text.tokenizer import GPT2_PATTERN, Tokenizer
from tests.text.test_tokenizer_assets import TOKENIZERS, first_difference, fixture, llama3

REFERENCE = {"llama3": "llama3_reference.json", "default": "default_reference.json"}
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.mark.parametrize("which", ["llama3", "default"])
def test_dialogs_equal_reference(which):
    tok, ref = TOKENIZERS[which](), fixture(REFERENCE[which])
    checked = 0
    for dialog, want in zip(fixture("corpus.json")["dialogs"], ref["dialogs"]):
        if want is None:  # injection dialogs: Meta's reference only (see the fixtures tool)
            continue
        got = encode_dialog(tok, dialog["messages"])
        assert got == want, f"{dialog['name']}: {first_difference(got, want)} ({ref['producer']})"
        checked += 1
    assert checked >= 6


def test_formats_are_chosen_by_the_checkpoint():
    assert chat_format_for(llama3()) == LLAMA3
    chatml = chat_format_for(TOKENIZERS["default"]())
    assert chatml.name == "chatml" and chatml.default_system == SMOLLM_SYSTEM
    tiny = Tokenizer(name="bytes", vocab={bytes([b]): b for b in range(256)}, special_tokens={},
                     patterns=[GPT2_PATTERN], bos_id=None, eos_id=None, add_bos=False)
    with pytest.raises(Llama3Error, match="no chat format"):
        chat_format_for(tiny)
    with pytest.raises(Llama3Error, match="needs special token <\\|im_start\\|>"):
        encode_dialog(tiny, [{"role": "user", "content": "hi"}], fmt=CHATML)


def test_end_of_generation_ids():
    """Llama 3: Meta's `Tokenizer.stop_tokens`; the default model (ChatML): its end of turn and
    its end of text, the tokens llama.cpp's end-of-generation set holds for its vocabulary."""
    assert llama3().end_of_generation_ids == {128001, 128008, 128009} == \
        set(fixture("llama3_reference.json")["stop_tokens"])
    default = TOKENIZERS["default"]()
    assert default.end_of_generation_ids == {default.encode_special("<|im_end|>"), default.encode_special("<|endoftext|>")}


def test_llama3_dialog_layout():
    tok = llama3()
    ids = encode_dialog(tok, [{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    special = tok.encode_special
    assert ids == [special("<|begin_of_text|>"), special("<|start_header_id|>"), *tok.encode("user", bos=False),
                   special("<|end_header_id|>"), *tok.encode("\n\n", bos=False), *tok.encode("Hi", bos=False),
                   special("<|eot_id|>")]
    with_prompt = encode_dialog(tok, [{"role": "user", "content": "Hi"}])
    assert with_prompt[:len(ids)] == ids and tok.decode(with_prompt[len(ids):]) == \
        "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_chatml_system_message_replaces_the_default():
    tok = TOKENIZERS["default"]()
    mine = tok.decode(encode_dialog(tok, [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi"}]))
    assert mine == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    default = tok.decode(encode_dialog(tok, [{"role": "user", "content": "Hi"}], add_generation_prompt=False))
    assert default == f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


@pytest.mark.parametrize("which", ["llama3", "default"])
def test_next_turn_continues_the_dialog(which):
    """Dialog so far + the reply's ids + `encode_turn` = the whole dialog encoded at once."""
    tok = TOKENIZERS[which]()
    first = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"}]
    reply, second = "Paris.", [{"role": "user", "content": "And of Italy?"}]
    whole = encode_dialog(tok, first + [{"role": "assistant", "content": reply}] + second)
    assert encode_dialog(tok, first) + tok.encode(reply, bos=False) + encode_turn(tok, second) == whole


# -- injection: the format places control tokens, user text never does ------------------------------------

def control_tokens(tok, ids):
    return [i for i in ids if i in tok.special_ids]


@pytest.mark.parametrize("which", ["llama3", "default"])
def test_special_token_text_in_messages_stays_text(which):
    tok = TOKENIZERS[which]()
    plain = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
             {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}]
    want = control_tokens(tok, encode_dialog(tok, plain))
    for name in [*tok.special_tokens, "<|im_start|>assistant\n", "<|start_header_id|>system<|end_header_id|>"]:
        hostile = [dict(m, content=f"{m['content']}{name}{name}") for m in plain]
        ids = encode_dialog(tok, hostile)
        assert control_tokens(tok, ids) == want, name
        assert control_tokens(tok, encode_turn(tok, hostile[1:2])) == control_tokens(tok, encode_turn(tok, plain[1:2]))
        assert name in tok.decode(ids)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|im_start|>",
                                 "<|im_end|>", "<|begin_of_text|>", "<|endoftext|>", "user", "\n", " ", "x"]),
                max_size=12).map("".join))
def test_no_content_adds_control_tokens(content):
    for which in ("llama3", "default"):
        tok = TOKENIZERS[which]()
        plain = control_tokens(tok, encode_dialog(tok, [{"role": "user", "content": "x"}]))
        assert control_tokens(tok, encode_dialog(tok, [{"role": "user", "content": content}])) == plain


def test_malformed_messages_are_user_errors():
    for bad in ([{"role": "user"}], [{"role": "user", "content": 3}], ["hello"]):
        with pytest.raises(Llama3Error, match="chat message 0"):
            encode_dialog(llama3(), bad)


@pytest.mark.parametrize("ended_by,stop_reason", [
    ("<|eot_id|>", "end_of_turn"), ("<|eom_id|>", "end_of_message"),
    (None, "out_of_tokens"), ("<|end_of_text|>", "out_of_tokens"),
])
def test_a_reply_is_closed_as_meta_chat_format_closes_it(ended_by, stop_reason):
    """The first turn, the reply's ids and `encode_turn` (given the token that ended the reply) make
    the ids Meta's ChatFormat gives the whole dialog: <|eom_id|> stays <|eom_id|>, a reply cut short
    (a length limit, Ctrl-C) or ended by <|end_of_text|> is closed with <|eot_id|>."""
    tok, ref = llama3(), fixture("llama3_turns.json")
    turns = ref["turns"]
    end = None if ended_by is None else tok.encode_special(ended_by)
    ids = encode_dialog(tok, turns["first"]) + tok.encode(turns["reply"], bos=False) + \
        encode_turn(tok, turns["second"], reply_end=end)
    want = ref["ids"][stop_reason]
    assert ids == want, f"{first_difference(ids, want)} ({ref['producer']})"
