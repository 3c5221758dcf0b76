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
    out = Session(weights, config, ctx=64).generate(PROMPT, GREEDY, np.random.default_rng(0), max_new=12).run()
    assert out.ids == greedy_without_cache(weights, config, PROMPT, 12)
    assert out.stop_reason == "length" and len(out.ids) == 12


def test_stops_at_a_stop_token_and_keeps_it(model):
    weights, config = model
    expected = greedy_without_cache(weights, config, PROMPT, 12)
    stop = expected[4]
    first = expected.index(stop)
    out = Session(weights, config, ctx=64).generate(PROMPT, GREEDY, np.random.default_rng(0), 12, [stop]).run()
    assert out.stop_reason == "stop" and out.ids == expected[:first + 1]
    assert out.text_ids == expected[:first]


def test_reaching_the_context_stops_with_context(model):
    weights, config = model
    session = Session(weights, config, ctx=len(PROMPT) + 3)
    out = session.generate(PROMPT, GREEDY, np.random.default_rng(0), max_new=-1).run()
    # 3 free slots: 3 generated tokens are fed back, a 4th comes from the last slot's logits.
    assert out.stop_reason == "context" and len(out.ids) == 4
    assert session.cache.length == session.ctx


def test_a_second_turn_continues_the_same_cache(model):
    weights, config = model
    session = Session(weights, config, ctx=64)
    first = session.generate(PROMPT, GREEDY, np.random.default_rng(0), max_new=3).run()
    follow = [7, 8]
    second = session.generate(follow, GREEDY, np.random.default_rng(0), max_new=4).run()
    whole = PROMPT + first.ids[:-1] + follow  # the last sampled token of turn 1 was never fed
    assert session.history == whole + second.ids[:-1]
    assert second.ids == greedy_without_cache(weights, config, whole, 4)


def test_prompt_longer_than_the_context_is_a_clear_error(model):
    weights, config = model
    with pytest.raises(Llama3Error, match="the prompt has 6 tokens but only 5 of the 5-token context"):
        Session(weights, config, ctx=5).generate(PROMPT, GREEDY, np.random.default_rng(0), 1)
    with pytest.raises(Llama3Error, match="prompt is empty"):
        Session(weights, config, ctx=5).generate([], GREEDY, np.random.default_rng(0), 1)
    with pytest.raises(ParameterError, match="^max_new must be >= 0"):
        Session(weights, config, ctx=5).generate([1], GREEDY, np.random.default_rng(0), -2)


def test_max_new_zero_feeds_the_prompt_and_draws_nothing(model):
    """llama.cpp's -n 0: the prompt is evaluated, no token is drawn."""
    weights, config = model
    session = Session(weights, config, ctx=16)
    out = session.generate(PROMPT, GREEDY, max_new=0)
    assert list(out) == [] and out.ids == [] and out.stop_reason == "length"
    assert session.history == PROMPT


def test_repeat_penalty_window_is_the_last_64_ids_fed(model, monkeypatch):
    """Each draw sees the last 64 ids fed so far, prompt and generated alike, each once."""
    import llama3_np.generation as generation

    weights, config = model
    seen = []
    real_sample = generation.sample
    monkeypatch.setattr(generation, "sample",
                        lambda logits, params, rng, recent, xtc=None: seen.append(list(recent)) or real_sample(logits, params, rng, recent, xtc))
    prompt = [i % config.vocab_size for i in range(70)]
    session = Session(weights, config, ctx=128)
    out = session.generate(prompt, SamplingParams(temperature=0, repeat_penalty=1.3), np.random.default_rng(0), 5).run()
    fed = prompt + out.ids
    assert seen == [fed[:70 + k][-64:] for k in range(5)]


# --- the session's cache always equals its history, whatever ended a turn --------------------------
#
# "The next turn's logits equal a fresh session's": the fresh session is fed the whole history in
# one prefill, the continued one got it as a prefill plus decode steps (other matrix shapes, other
# summation orders in BLAS), so they agree to float32 rounding: NMSE <= 1e-10, the bound the
# chunked-prefill test uses.

FOLLOW = [7, 8, 9]


def assert_next_turn_matches_a_fresh_session(session, ids):
    """Feed `ids` as the next turn; its logits equal those of a new session fed history + ids."""
    from tests.helpers import assert_close

    before = session.history
    logits = session.feed(ids)
    assert session.history == before + ids and session.cache.length == len(session.history)
    fresh = Session(session.weights, session.config, session.ctx).feed(session.history)
    assert_close(logits, fresh, "next turn's logits vs a fresh session's", 1e-10)


def test_after_a_stop_token_the_stop_token_is_unfed_and_kept(model):
    weights, config = model
    expected = greedy_without_cache(weights, config, PROMPT, 12)
    session = Session(weights, config, ctx=64)
    out = session.generate(PROMPT, GREEDY, np.random.default_rng(0), 12, [expected[4]]).run()
    assert out.stop_reason == "stop" and out.unfed_ids == [expected[4]]
    assert session.history == PROMPT + out.ids[:-1]
    assert_next_turn_matches_a_fresh_session(session, out.unfed_ids + FOLLOW)


def test_after_the_length_limit_the_last_token_is_unfed(model):
    weights, config = model
    session = Session(weights, config, ctx=64)
    out = session.generate(PROMPT, GREEDY, np.random.default_rng(0), 5).run()
    assert out.stop_reason == "length" and out.unfed_ids == out.ids[-1:]
    assert session.history == PROMPT + out.ids[:-1]
    assert_next_turn_matches_a_fresh_session(session, out.unfed_ids + FOLLOW)


def test_after_a_full_context_the_cache_holds_every_slot_it_claims(model):
    weights, config = model
    session = Session(weights, config, ctx=len(PROMPT) + 3)
    out = session.generate(PROMPT, GREEDY, np.random.default_rng(0), -1).run()
    assert out.stop_reason == "context" and session.history == PROMPT + out.ids[:3] and out.unfed_ids == out.ids[3:]
    session.rollback(session.ctx - 2)  # make room: what is left is still what history says
    assert_next_turn_matches_a_fresh_session(session, FOLLOW[:2])


@pytest.mark.parametrize("when", range(1, 9))
def test_ctrl_c_inside_a_chunked_prefill_rolls_the_prompt_back(model, monkeypatch, when):
    """A 13-token prompt in chunks of 4 is 4 forward calls of 2 layers: KeyboardInterrupt in the
    `when`-th layer call leaves some layers of some chunk written; the session forgets the prompt."""
    from llama3_np import generation, model as model_module

    weights, config = model
    monkeypatch.setattr(generation, "PREFILL_CHUNK", 4)
    session = Session(weights, config, ctx=64)
    session.feed(PROMPT)  # an earlier turn, which must survive
    calls, block = [], model_module.transformer_block

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == when:
            raise KeyboardInterrupt
        return block(*args, **kwargs)

    monkeypatch.setattr(model_module, "transformer_block", interrupted)
    out = session.generate(list(range(20, 33)), GREEDY, np.random.default_rng(0), 4)
    with pytest.raises(KeyboardInterrupt):  # the library does not swallow it
        out.run()
    monkeypatch.setattr(model_module, "transformer_block", block)
    assert not out.prompt_fed and out.ids == [] and session.history == PROMPT
    assert_next_turn_matches_a_fresh_session(session, FOLLOW)


def test_ctrl_c_inside_a_decode_step_leaves_the_drawn_token_unfed(model, monkeypatch):
    from llama3_np import model as model_module

    weights, config = model
    session = Session(weights, config, ctx=64)
    out = session.generate(PROMPT, GREEDY, np.random.default_rng(0), 10)
    steps = iter(out)
    next(steps), next(steps)  # two tokens drawn, the first fed
    block, layers = model_module.transformer_block, []

    def interrupted_in_layer_1(*args):
        layers.append(len(layers))  # the token's layers run in order: 0, then 1
        if layers[-1] == 1:
            raise KeyboardInterrupt
        return block(*args)

    monkeypatch.setattr(model_module, "transformer_block", interrupted_in_layer_1)
    with pytest.raises(KeyboardInterrupt):
        next(steps)  # feeding the second token: interrupted in layer 1, after layer 0 wrote its slot
    monkeypatch.setattr(model_module, "transformer_block", block)
    assert out.prompt_fed and session.history == PROMPT + out.ids[:1] and out.unfed_ids == out.ids[1:]
    assert_next_turn_matches_a_fresh_session(session, out.unfed_ids + FOLLOW)


def test_leaving_the_loop_early_leaves_the_last_token_unfed(model):
    weights, config = model
    session = Session(weights, config, ctx=64)
    out = session.generate(PROMPT, GREEDY, np.random.default_rng(0), 10)
    for n, step in enumerate(out, 1):
        if n == 3:
            break  # as the command line does when Ctrl-C lands while it prints
    assert out.stop_reason == "" and len(out.ids) == 3 and out.unfed_ids == out.ids[2:]
    assert session.history == PROMPT + out.ids[:2]
    assert_next_turn_matches_a_fresh_session(session, out.unfed_ids + FOLLOW)


def test_each_step_records_what_its_token_was_drawn_from(model):
    """The logits are the cache-free forward's for that position; `probs` is the sampler's
    distribution, from which the token was drawn."""
    from llama3_np.sampling import sampling_probs
    from tests.helpers import assert_close

    weights, config = model
    params = SamplingParams(temperature=1.2, top_k=5, top_p=1.0, min_p=0.0, repeat_penalty=1.5)
    session = Session(weights, config, ctx=64)
    steps = list(session.generate(PROMPT, params, np.random.default_rng(3), 6))
    ids = PROMPT + [s.token for s in steps]
    for n, s in enumerate(steps):
        context = ids[:len(PROMPT) + n]
        assert_close(s.logits, forward(weights, config, context)[-1], f"step {n} logits", 1e-10)
        assert s.recent == tuple(context[-64:])
        assert np.array_equal(s.probs(), sampling_probs(s.logits, params, context[-64:])) and s.probs()[s.token] > 0


def test_steps_record_xtc_draws_and_dry_windows_so_their_distributions_replay(model):
    """XTC's draw comes from the generation's generator and is recorded; DRY looks at its own
    window (here longer than the penalties')."""
    from llama3_np.sampling import sampling_probs

    weights, config = model
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_last_n=4, dry_multiplier=0.8,
                            dry_allowed_length=1, dry_penalty_last_n=-1, dry_sequence_breakers=(),
                            xtc_probability=0.5, xtc_threshold=0.01)
    session = Session(weights, config, ctx=64)
    steps = list(session.generate(PROMPT, params, np.random.default_rng(5), 8))
    again = list(Session(weights, config, ctx=64).generate(PROMPT, params, np.random.default_rng(5), 8))
    assert [s.token for s in steps] == [s.token for s in again]
    ids = PROMPT + [s.token for s in steps]
    draws = [s.xtc_draw for s in steps]
    assert all(d is not None for d in draws) and min(draws) <= 0.5 < max(draws)  # XTC acted at some steps only
    for n, s in enumerate(steps):
        assert s.recent == tuple(ids[:len(PROMPT) + n])  # DRY's window: every id before
        assert np.array_equal(s.probs(), sampling_probs(s.logits, params, s.recent, s.xtc_draw))
        assert s.probs()[s.token] > 0


def test_suppressed_ids_are_never_drawn(model):
    weights, config = model
    expected = greedy_without_cache(weights, config, PROMPT, 1)[0]
    session = Session(weights, config, ctx=64)
    steps = list(session.generate(PROMPT, GREEDY, np.random.default_rng(0), 6, suppress_ids=[expected]))
    assert all(s.token != expected for s in steps) and len(steps) == 6
    assert steps[0].probs()[expected] == 0 and np.isneginf(steps[0].sampler_logits()[expected])
    assert np.isfinite(steps[0].logits[expected])  # the model's own logits stay as they were


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


def test_a_session_ends_at_its_stop_ids_unless_told_otherwise(model):
    """Safe by default, as llama-models and mlx-lm: a session knowing its model's end-of-generation
    ids (`LoadedModel.session` gives them) stops there without being told; `stop_ids=()` runs on."""
    weights, config = model
    expected = greedy_without_cache(weights, config, PROMPT, 12)
    stop = expected[4]
    session = Session(weights, config, ctx=64, stop_ids=[stop])
    out = session.generate(PROMPT, max_new=12).run()
    assert out.stop_reason == "stop" and out.ids == expected[:expected.index(stop) + 1]
    again = Session(weights, config, ctx=64, stop_ids=[stop]).generate(PROMPT, max_new=12, stop_ids=()).run()
    assert again.stop_reason == "length" and again.ids == expected


def test_greedy_decoding_needs_no_random_generator(model):
    from llama3_np.sampling import sample

    weights, config = model
    out = Session(weights, config, ctx=64).generate(PROMPT, max_new=6).run()  # no params: greedy
    assert out.ids == greedy_without_cache(weights, config, PROMPT, 6)
    logits = forward(weights, config, PROMPT)[-1]
    assert sample(logits, GREEDY) == int(np.argmax(logits))
    with pytest.raises(Llama3Error, match="sampling draws at random: pass rng"):
        sample(logits, SamplingParams(temperature=1.0))
    with pytest.raises(Llama3Error, match="sampling draws at random: pass rng"):
        Session(weights, config, ctx=64).generate(PROMPT, SamplingParams(temperature=1.0)).run()


def test_a_long_prompt_reports_its_progress_to_the_callback(monkeypatch, model):
    from llama3_np import generation

    monkeypatch.setattr(generation, "PREFILL_CHUNK", 4)
    weights, config = model
    seen = []
    session = Session(weights, config, ctx=64, progress=lambda done, total: seen.append((done, total)))
    session.feed(list(range(1, 11)))
    session.feed([3, 4])  # one chunk: nothing to report
    assert seen == [(0, 10), (4, 10), (8, 10), (10, 10)]


def test_a_step_explains_its_candidates_by_the_model_s_probability(model):
    """What --explain prints is the library's: the k most probable tokens (ranked by the model's
    own softmax, all samplers off), the drawn one after them when it ranks lower, and what the
    sampler gave each."""
    weights, config = model
    params = SamplingParams(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0)
    steps = list(Session(weights, config, ctx=64).generate(PROMPT, params, np.random.default_rng(3), 6))
    for step in steps:
        z = step.logits.astype(np.float64)
        model_p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        rows = step.candidates(2)
        assert [c.id for c in rows[:2]] == list(np.argsort(-step.logits, kind="stable")[:2])
        assert [c.rank for c in rows[:2]] == [1, 2] and step.token in [c.id for c in rows]
        for c in rows:
            assert c.p == pytest.approx(model_p[c.id], rel=1e-6) and c.logit == step.logits[c.id]
            assert c.sampled_p == step.probs()[c.id]
        assert len(rows) == 2 + (rows[-1].rank > 2)
    assert any(len(step.candidates(1)) == 2 for step in steps)  # a draw that was not the most probable
    with pytest.raises(ParameterError, match="must be >= 1"):
        steps[0].candidates(0)
