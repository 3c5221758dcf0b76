"""A chat keeps its ids: after a context shift the kept turns are fed again exactly as the model
saw them, a `<|python_tag|>` tool call and an answer that ended with `<|eom_id|>` included; the
fed ids equal those of a fresh chat that never held the dropped turn."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama3_np import Llama3Error, generation
from llama3_np.formats.checkpoint import Checkpoint
from llama3_np.load import LoadedModel
from tests.helpers import random_weights, tiny_config
from tests.text.test_tokenizer_assets import llama3

EXCHANGES = [  # (the user's message, the model's answer: text and the special token that ended it)
    ("What is 2 + 2?", None, "4", "<|eot_id|>"),
    ("What is the weather in Paris?", "<|python_tag|>", 'brave_search.call(query="weather in Paris")', "<|eom_id|>"),
    ("It is sunny and 24 degrees.", None, "It is sunny in Paris, 24 degrees.", "<|eot_id|>"),
    ("Thanks!", None, "You are welcome.", "<|eot_id|>"),
]


@pytest.fixture(scope="module")
def model():
    tok = llama3()
    config = tiny_config(dim=16, n_heads=2, n_kv_heads=1, head_dim=8, ffn_dim=32, vocab_size=tok.n_vocab)
    return LoadedModel(Checkpoint(Path("tiny"), "hf", config, random_weights(config, seed=3), "float32"), tok, 0.0)


def answer_ids(tok, tag, text, end) -> list[int]:
    return ([tok.encode_special(tag)] if tag else []) + tok.encode(text, bos=False) + [tok.encode_special(end)]


def chat(model, monkeypatch, exchanges, ctx):
    """A ChatSession through `exchanges`, the model's draws scripted; the session, and how many
    turns each message dropped."""
    script = [i for _, tag, text, end in exchanges for i in answer_ids(model.tokenizer, tag, text, end)]
    monkeypatch.setattr(generation, "sample", lambda logits, params, rng=None, recent=(), xtc=None: script.pop(0))
    session = model.chat_session(system="You can search the web.", ctx=ctx)
    dropped = []
    for user, *_ in exchanges:
        out = session.send(user, max_new=24).run()
        assert out.stop_reason == "stop"
        dropped.append(session.dropped)
    assert not script
    return session, dropped


def test_a_context_shift_feeds_the_kept_turns_as_the_model_saw_them(model, monkeypatch):
    tok = model.tokenizer
    fresh, dropped = chat(model, monkeypatch, EXCHANGES[1:], ctx=4096)
    assert dropped == [0, 0, 0]
    # The context the fresh chat needed for its last message and the answer's room, exactly:
    # the same chat with the first exchange before them must drop it.
    ctx = len(fresh.session.history) - len(answer_ids(tok, *EXCHANGES[-1][1:])) + 1 + 24
    shifted, dropped = chat(model, monkeypatch, EXCHANGES, ctx=ctx)
    assert dropped == [0, 0, 0, 1]
    assert shifted.session.history == fresh.session.history
    fed = shifted.session.history
    tag, eom = tok.encode_special("<|python_tag|>"), tok.encode_special("<|eom_id|>")
    call = answer_ids(tok, *EXCHANGES[1][1:])
    assert fed[fed.index(tag):fed.index(tag) + len(call)] == call  # the tool call and its <|eom_id|>
    assert fed.count(eom) == 1 and tok.decode(fed).count("<|python_tag|>") == 1
    assert [m["content"] for m in shifted.messages()][1::2] == [u for u, *_ in EXCHANGES[1:]]


def test_a_message_that_cannot_fit_changes_nothing(model, monkeypatch):
    session, _ = chat(model, monkeypatch, EXCHANGES[:1], ctx=64)
    before, messages = session.session.history, session.messages()
    assert len(messages) == 3
    with pytest.raises(Llama3Error, match="this message takes .* the context holds 64"):
        session.send("word " * 80)
    assert session.session.history == before and session.messages() == messages
