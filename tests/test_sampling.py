"""The sampler's filters leave exactly the distribution their definitions say, in the documented
order, and a seed reproduces a draw."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from llama3_np.errors import ParameterError
from llama3_np.sampling import SamplingParams, apply_repeat_penalty, sample, sampling_probs

OFF = dict(top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
LOGITS = np.log(np.array([0.05, 0.30, 0.10, 0.25, 0.02, 0.08, 0.20], dtype=np.float32))


def softmax64(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def test_greedy_picks_argmax_whatever_the_filters():
    p = SamplingParams(temperature=0, top_k=1, top_p=0.1, min_p=0.9)
    assert sample(LOGITS, p, np.random.default_rng(0)) == 1
    assert sampling_probs(LOGITS, p)[1] == 1.0


def test_temperature_one_with_filters_off_is_the_softmax():
    probs = sampling_probs(LOGITS, SamplingParams(temperature=1.0, **OFF))
    np.testing.assert_allclose(probs, softmax64(LOGITS.astype(np.float64)), rtol=1e-6)


def test_temperature_scales_logits_before_softmax():
    probs = sampling_probs(LOGITS, SamplingParams(temperature=0.5, **OFF))
    np.testing.assert_allclose(probs, softmax64(LOGITS.astype(np.float64) / 0.5), rtol=1e-6)


def test_top_k_keeps_the_k_most_probable_renormalised():
    probs = sampling_probs(LOGITS, SamplingParams(temperature=1.0, **dict(OFF, top_k=3)))
    assert set(np.flatnonzero(probs)) == {1, 3, 6}
    np.testing.assert_allclose(probs[[1, 3, 6]], np.array([0.30, 0.25, 0.20]) / 0.75, rtol=1e-6)


@pytest.mark.parametrize("p,kept", [(0.30, {1}), (0.31, {1, 3}), (0.55, {1, 3}), (0.56, {1, 3, 6}),
                                    (0.999, {0, 1, 2, 3, 4, 5, 6})])
def test_top_p_keeps_the_smallest_prefix_whose_mass_reaches_p(p, kept):
    probs = sampling_probs(LOGITS, SamplingParams(temperature=1.0, **dict(OFF, top_p=p)))
    assert set(np.flatnonzero(probs)) == kept
    base = softmax64(LOGITS.astype(np.float64))
    idx = sorted(kept)
    np.testing.assert_allclose(probs[idx], base[idx] / base[idx].sum(), rtol=1e-6)


def test_min_p_drops_tokens_below_p_times_the_max():
    # max probability 0.30: min_p 0.3 -> threshold 0.09 keeps 0.30, 0.25, 0.20, 0.10
    probs = sampling_probs(LOGITS, SamplingParams(temperature=1.0, **dict(OFF, min_p=0.3)))
    assert set(np.flatnonzero(probs)) == {1, 3, 6, 2}


def test_filters_apply_after_temperature():
    # At temperature 2 the distribution flattens, so top-p 0.5 needs three tokens, not two.
    hot = sampling_probs(LOGITS, SamplingParams(temperature=2.0, **dict(OFF, top_p=0.5)))
    cold = sampling_probs(LOGITS, SamplingParams(temperature=1.0, **dict(OFF, top_p=0.5)))
    assert np.count_nonzero(cold) == 2 and np.count_nonzero(hot) == 3


def test_repeat_penalty_ctrl_rule():
    logits = np.array([2.0, -2.0, 1.0, 0.5], dtype=np.float32)
    out = apply_repeat_penalty(logits, [0, 1, 1], 2.0)
    np.testing.assert_array_equal(out, [1.0, -4.0, 1.0, 0.5])


def test_seed_reproduces_and_draws_follow_the_distribution():
    params = SamplingParams(temperature=1.0, **dict(OFF, top_k=4))
    draws = [sample(LOGITS, params, np.random.default_rng(seed)) for seed in range(4000)]
    again = [sample(LOGITS, params, np.random.default_rng(seed)) for seed in range(4000)]
    assert draws == again
    freq = np.bincount(draws, minlength=LOGITS.size) / len(draws)
    expected = sampling_probs(LOGITS, params)
    # 4000 draws: the standard error of a frequency near 0.3 is about 0.007; allow 4 of them.
    np.testing.assert_allclose(freq, expected, atol=0.03)
    assert freq[[0, 4, 5]].sum() == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-30, 30), min_size=2, max_size=50), st.floats(0.05, 3),
       st.integers(0, 60), st.floats(0.01, 1.0), st.floats(0, 0.99))
def test_probs_are_a_distribution_that_always_keeps_the_top_token(z, temp, k, top_p, min_p):
    logits = np.array(z, dtype=np.float32)
    probs = sampling_probs(logits, SamplingParams(temp, k, top_p, min_p))
    assert abs(probs.sum() - 1) < 1e-9 and np.all(probs >= 0)
    assert probs[int(np.argmax(logits))] > 0
    if k:
        assert np.count_nonzero(probs) <= k


@pytest.mark.parametrize("kwargs", [
    dict(temperature=-0.1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=1.0),
    dict(repeat_penalty=0), dict(temperature=float("nan")),
])
def test_invalid_values_are_rejected_naming_the_parameter_not_a_flag(kwargs):
    (name, value), = kwargs.items()
    with pytest.raises(ParameterError, match=f"^{name} must be .*, got {value}$") as e:
        SamplingParams(**kwargs)
    assert e.value.parameter == name and "--" not in str(e.value)


def test_top_token_survives_top_p_when_probabilities_round_equal():
    # exp() maps these two logits to the same float64 probability; the larger logit must still win.
    logits = np.array([0.0, 1.568847088527949e-42], dtype=np.float32)
    probs = sampling_probs(logits, SamplingParams(1.0, 0, 0.5, 0.0))
    assert probs[1] == 1.0
