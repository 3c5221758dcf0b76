"""A conversation kept as ids: its turns put together are the ids the chat format gives the whole
dialog, and the oldest whole turns go first when the context fills, the system prompt staying."""

import pytest

from llama3_np.errors import Llama3Error
from llama3_np.text.chat import chat_format_for, encode_dialog
from llama3_np.text.dialog import Conversation, Turn
from tests.text.test_tokenizer_assets import TOKENIZERS


@pytest.mark.parametrize("which", ["llama3", "default"])
def test_turns_put_together_are_the_dialog_and_the_oldest_go_first(which):
    tok = TOKENIZERS[which]()
    fmt = chat_format_for(tok)
    conv = Conversation(tok, fmt, "Be brief.")
    exchanges = [("q1 " * 20, "a1 " * 20), ("q2", "a2")]
    for user, answer in exchanges:  # as a chat keeps them: the drawn ids and the usual end
        conv.turns.append(Turn(user, answer, conv.message_ids(user) + tok.encode(answer, bos=False)
                               + conv.close_ids(None)))
    system = [{"role": "system", "content": "Be brief."}]
    dialog = [{"role": role, "content": text} for user, answer in exchanges
              for role, text in (("user", user), ("assistant", answer))]
    message = conv.message_ids("q3")
    whole = encode_dialog(tok, system + dialog + [{"role": "user", "content": "q3"}], fmt=fmt)
    assert conv.ids() + message == whole
    assert conv.fit(message, ctx=len(whole) + 10, room=10) == 0
    assert conv.fit(message, ctx=len(whole) + 9, room=10) == 1 and [t.user for t in conv.turns] == ["q2"]
    assert conv.ids() + message == encode_dialog(tok, system + dialog[2:] + [{"role": "user", "content": "q3"}],
                                                 fmt=fmt)
    with pytest.raises(Llama3Error, match="this message takes .* and its answer 5 more: the context holds 20"):
        conv.fit(conv.message_ids("q3 " * 30), ctx=20, room=5)
    assert [t.user for t in conv.turns] == ["q2"]


def test_the_end_an_answer_really_had_closes_it():
    tok = TOKENIZERS["llama3"]()
    conv = Conversation(tok, chat_format_for(tok))
    eom, eot, eos = (tok.encode_special(t) for t in ("<|eom_id|>", "<|eot_id|>", "<|end_of_text|>"))
    assert conv.close_ids(eom) == [eom] and conv.close_ids(eot) == [eot]
    assert conv.close_ids(eos) == conv.close_ids(None) == [eot]  # Meta's ChatFormat: out_of_tokens
