"""The generation loop: the cached decode path gives the tokens a cache-free forward would,
and generation stops where it should (stop token, -n, context)."""

import numpy as np
import pytest

from llama3_np import Llama3Error, ParameterError
from llama3_np.generation import Session
from llama3_np.model import forward
from llama3_np.sampling import SamplingParams
from tests.helpers import assert_close, random_weights, tiny_config

GREEDY = SamplingParams(temperature=0)
PROMPT = [3, 14, 15, 9, 26, 35]


@pytest.fixture(scope="module")
def model():
    config = tiny_config(vocab_size=64)
    return random_weights(config, seed=7), config


def greedy_without_cache(weights, config, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(forward(weights, config, ids)[-1])))
    return ids[len(prompt):]


def test_greedy_generation_equals_cache_free_argmax(model):
    weights, config = model
    out = Session(weights, config, ctx=64).generate(PROMPT, GREEDY, np.random.default_rng(0), max_new=12)
    assert out.ids == greedy_without_cache(weights, config, PROMPT, 12)
    assert out.stop_reason == "length" and len(out.ids) == 12


def test_stops_at_a_stop_token_and_keeps_it(model):
    weights, config = model
    expected = greedy_without_cache(weights, config, PROMPT, 12)
    stop = expected[4]
    first = expected.index(stop)
    out = Session(weights, config, ctx=64).generate(PROMPT, GREEDY, np.random.default_rng(0), 12, [stop])
    assert out.stop_reason == "stop" and out.ids == expected[:first + 1]
    assert out.text_ids == expected[:first]


def test_reaching_the_context_stops_with_length(model):
    weights, config = model
    session = Session(weights, config, ctx=len(PROMPT) + 3)
    out = session.generate(PROMPT, GREEDY, np.random.default_rng(0), max_new=-1)
    # 3 free slots: 3 generated tokens are fed back, a 4th comes from the last slot's logits.
    assert out.stop_reason == "length" and len(out.ids) == 4
    assert session.cache.length == session.ctx


def test_a_second_turn_continues_the_same_cache(model):
    weights, config = model
    session = Session(weights, config, ctx=64)
    first = session.generate(PROMPT, GREEDY, np.random.default_rng(0), max_new=3)
    follow = [7, 8]
    second = session.generate(follow, GREEDY, np.random.default_rng(0), max_new=4)
    whole = PROMPT + first.ids[:-1] + follow  # the last sampled token of turn 1 was never fed
    assert session.history == whole + second.ids[:-1]
    assert second.ids == greedy_without_cache(weights, config, whole, 4)


def test_prompt_longer_than_the_context_is_a_clear_error(model):
    weights, config = model
    with pytest.raises(Llama3Error, match="the prompt has 6 tokens but only 5 of the 5-token context"):
        Session(weights, config, ctx=5).generate(PROMPT, GREEDY, np.random.default_rng(0), 1)
    with pytest.raises(Llama3Error, match="prompt is empty"):
        Session(weights, config, ctx=5).generate([], GREEDY, np.random.default_rng(0), 1)
    with pytest.raises(ParameterError, match="^max_new must be >= 1"):
        Session(weights, config, ctx=5).generate([1], GREEDY, np.random.default_rng(0), 0)


def test_repeat_penalty_window_is_the_last_64_ids_fed(model, monkeypatch):
    """Each draw sees the last 64 ids fed so far, prompt and generated alike, each once."""
    import llama3_np.generation as generation

    weights, config = model
    seen = []
    real_sample = generation.sample
    monkeypatch.setattr(generation, "sample",
                        lambda logits, params, rng, recent: seen.append(list(recent)) or real_sample(logits, params, rng, recent))
    prompt = [i % config.vocab_size for i in range(70)]
    session = Session(weights, config, ctx=128)
    out = session.generate(prompt, SamplingParams(temperature=0, repeat_penalty=1.3), np.random.default_rng(0), 5)
    fed = prompt + out.ids
    assert seen == [fed[:70 + k][-64:] for k in range(5)]


@pytest.mark.parametrize("chunk", [1, 4, 5, 64])
def test_a_prompt_fed_in_chunks_gives_the_logits_of_one_forward(monkeypatch, chunk):
    from llama3_np import generation

    monkeypatch.setattr(generation, "PREFILL_CHUNK", chunk)
    config = tiny_config(vocab_size=64)
    weights = random_weights(config, seed=5)
    prompt = [int(i) for i in np.random.default_rng(1).integers(0, 64, size=13)]
    session = generation.Session(weights, config, ctx=32)
    logits = session.feed(prompt)
    assert session.cache.length == 13 and session.history == prompt
    assert_close(logits, forward(weights, config, prompt)[-1], f"last logits, chunks of {chunk}", 1e-10)
    # The cache the chunks filled continues like the cache of one call.
    follow = session.feed([7])
    assert_close(follow, forward(weights, config, prompt + [7])[-1], "logits after the prompt", 1e-10)
