"""The sampler chain leaves exactly the distribution llama.cpp's chain and transformers' logits
processors leave (tests/fixtures/sampling/chains.json.gz, tools/make_sampler_fixtures.py), in their
orders, and llama.cpp's other samplers each alone and in its default chain
(tests/fixtures/sampling/llama_cpp_samplers.json.gz); each filter only removes tokens; a seed
reproduces a draw."""

import functools
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from llama3_np.assets import llama3_tokenizer_path
from llama3_np.errors import ParameterError
from llama3_np.sampling import (DEFAULT_SAMPLERS, SAMPLER_NAMES, SAMPLER_ORDERS, DryBreakers, SamplingParams,
                                dry_breakers, parse_sampler_chars, parse_samplers, sample, sampling_probs, survivors)
from llama3_np.text.tokenizer import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "sampling"
FIXTURE = json.loads(gzip.decompress((FIXTURES / "chains.json.gz").read_bytes()))
SAMPLERS_FIXTURE = json.loads(gzip.decompress((FIXTURES / "llama_cpp_samplers.json.gz").read_bytes()))
OFF = dict(top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
LOGITS = np.log(np.array([0.05, 0.30, 0.10, 0.25, 0.02, 0.08, 0.20], dtype=np.float32))
LLAMA_CPP, TRANSFORMERS = SAMPLER_ORDERS["llama.cpp"], SAMPLER_ORDERS["transformers"]


def softmax64(z):
    e = np.exp(z - z.max())
    return e / e.sum()


# --- the references ----------------------------------------------------------------------------

def reference_points():
    for r in FIXTURE["results"]:
        case, setting = FIXTURE["cases"][r["case"]], FIXTURE["settings"][r["setting"]]
        yield pytest.param(case, setting, r, id=f"{r['order']}-{case['name']}-{r['setting']}")


@pytest.mark.parametrize("case,setting,ref", list(reference_points()))
def test_distribution_matches_the_reference_in_its_order(case, setting, ref):
    """llama.cpp order against llama.cpp's chain, transformers order against transformers' processors:
    L1 distance <= 1e-6 (the references hold float32 probabilities; their rounding is ~1e-7)."""
    logits = np.array(case["logits"], dtype=np.float32)
    want = np.zeros(logits.size)
    want[ref["ids"]] = ref["probs"]
    params = fixture_params(setting, FIXTURE["orders"][ref["order"]])
    got = sampling_probs(logits, params, case["recent"])
    l1 = np.abs(got - want).sum()
    assert l1 <= 1e-6, (f"{ref['order']} on {case['name']} with {setting}: L1 {l1:.3g}; kept "
                        f"{np.flatnonzero(got).tolist()}, reference kept {ref['ids']}")


def sampler_points():
    for r in SAMPLERS_FIXTURE["results"]:
        case, setting = SAMPLERS_FIXTURE["cases"][r["case"]], SAMPLERS_FIXTURE["settings"][r["setting"]]
        yield pytest.param(case, setting, r, id=f"{r['chain']}-{case['name']}-{r['setting']}")


@functools.cache
def llama3_tokenizer():
    return load_tokenizer(llama3_tokenizer_path().parent)


def fixture_params(setting: dict, samplers) -> SamplingParams:
    params = SamplingParams(**{**setting, "dry_sequence_breakers": tuple(setting.get("dry_sequence_breakers", ()))},
                            samplers=tuple(samplers))
    # llama.cpp made the breakers' tokens from its Llama 3 vocabulary; llama3_np from Meta's tokenizer
    return params.for_tokenizer(llama3_tokenizer()) if params.dry_sequence_breakers else params


@pytest.mark.parametrize("case,setting,ref", list(sampler_points()))
def test_llama_cpp_samplers_alone_and_in_the_default_chain(case, setting, ref):
    """Frequency and presence penalties, DRY, typical sampling, top-n-sigma and XTC against
    llama.cpp's, alone and in its default chain: L1 <= 1e-6. A DRY point brings its own history,
    an XTC point the draw llama.cpp's XTC made."""
    logits = np.array(case["logits"], dtype=np.float32)
    want = np.zeros(logits.size)
    want[ref["ids"]] = ref["probs"]
    got = sampling_probs(logits, fixture_params(setting, ref["samplers"]), ref.get("recent", case["recent"]),
                         ref.get("xtc_draw"))
    l1 = np.abs(got - want).sum()
    assert l1 <= 1e-6, (f"{ref['samplers']} on {case['name']} with {setting}: L1 {l1:.3g}; kept "
                        f"{np.flatnonzero(got).tolist()}, reference kept {ref['ids']}")


def test_the_sampler_fixture_covers_each_sampler_alone_and_in_the_default_chain():
    chains = {(r["chain"], tuple(r["samplers"])) for r in SAMPLERS_FIXTURE["results"]}
    assert ("llama.cpp", DEFAULT_SAMPLERS) in chains
    for name in ("penalties", "dry", "typ_p", "top_n_sigma", "xtc"):
        assert ("alone", (name,)) in chains, name
    settings = SAMPLERS_FIXTURE["settings"]
    assert {0.25, 0.75, 0.875} <= {s["typical_p"] for s in settings}  # exact boundaries on `exact`
    assert any(s["frequency_penalty"] < 0 for s in settings) and any(s["presence_penalty"] < 0 for s in settings)


def test_the_fixture_covers_what_it_claims():
    cases = {c["name"]: c for c in FIXTURE["cases"]}
    grid = FIXTURE["settings"]
    assert FIXTURE["orders"] == {name: list(order) for name, order in SAMPLER_ORDERS.items()}
    assert any(s["top_k"] > max(len(c["logits"]) for c in cases.values()) for s in grid)
    assert any(s["temperature"] == 0 for s in grid) and any(0 < s["temperature"] <= 1e-3 for s in grid)
    assert any(s["top_k"] and s["min_p"] for s in grid) and any(s["repeat_penalty"] != 1 for s in grid)
    assert {"exact", "exact_top4", "default_model_0"} <= set(cases)
    assert len(FIXTURE["results"]) == 2 * len(cases) * len(grid)


def test_top_p_after_top_k_works_on_the_survivors():
    # probabilities .4 .3 .2 .1: top-k 2 leaves .4/.7 = .571 and .3/.7; top-p .5 then keeps one token.
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1], dtype=np.float32))
    for order in SAMPLER_ORDERS.values():
        probs = sampling_probs(logits, SamplingParams(1.0, 2, 0.5, 0.0, samplers=order))
        np.testing.assert_array_equal(probs, [1, 0, 0, 0])


def test_top_p_boundary_keeps_the_token_that_completes_p():
    # float32 weights exactly 1, 1/2, 1/4, 1/8, 1/8 (sum 2): masses .5, .75, .875, 1 are exact.
    logits = np.log(np.array([1, 0.5, 0.25, 0.125, 0.125])).astype(np.float32)
    for p, kept in [(0.5, 1), (0.75, 2), (0.7500001, 3), (0.875, 3)]:
        probs = sampling_probs(logits, SamplingParams(1.0, 0, p, 0.0))
        assert np.count_nonzero(probs) == kept, (p, probs)


def test_temperature_order_decides_what_top_p_keeps():
    # Last (llama.cpp), temperature 2 does not change the set top-p .5 keeps; first (transformers)
    # it flattens the distribution so top-p needs three tokens.
    hot = dict(temperature=2.0, **dict(OFF, top_p=0.5))
    assert np.count_nonzero(sampling_probs(LOGITS, SamplingParams(**hot, samplers=LLAMA_CPP))) == 2
    assert np.count_nonzero(sampling_probs(LOGITS, SamplingParams(**hot, samplers=TRANSFORMERS))) == 3
    # llama.cpp order: the survivors' logits divided by 2
    probs = sampling_probs(LOGITS, SamplingParams(**hot, samplers=LLAMA_CPP))
    np.testing.assert_allclose(probs[[1, 3]], softmax64(LOGITS[[1, 3]].astype(np.float64) / 2), rtol=1e-6)


def test_min_p_is_relative_to_the_largest_survivor():
    # max probability 0.30: min_p 0.3 -> threshold 0.09 keeps 0.30, 0.25, 0.20, 0.10
    probs = sampling_probs(LOGITS, SamplingParams(temperature=1.0, **dict(OFF, min_p=0.3)))
    assert set(np.flatnonzero(probs)) == {1, 3, 6, 2}


def test_top_k_ties_keep_the_lower_id_and_k_above_the_vocabulary_keeps_all():
    logits = np.array([1.0, 3.0, 2.0, 3.0, 2.0, 2.0], dtype=np.float32)
    ids, _ = survivors(logits, SamplingParams(1.0, 3, 1.0, 0.0))
    assert ids.tolist() == [1, 2, 3]
    ids, _ = survivors(logits, SamplingParams(1.0, 100, 1.0, 0.0))
    assert ids.tolist() == list(range(6))


def test_greedy_is_the_argmax_of_the_penalised_logits():
    logits = np.array([2.0, 2.5, -1.0, 2.5], dtype=np.float32)
    p = SamplingParams(temperature=0, top_k=3, top_p=0.1, min_p=0.9)
    assert sample(logits, p, np.random.default_rng(0)) == 1  # equal logits: the lower id
    penalised = SamplingParams(temperature=0, repeat_penalty=2.0)
    assert sample(logits, penalised, np.random.default_rng(0), recent=[1, 3]) == 0
    np.testing.assert_array_equal(sampling_probs(logits, penalised, [1, 3]), [1, 0, 0, 0])
    # Without temperature in the chain, temperature 0 is not applied (llama.cpp: left out, not applied).
    assert np.count_nonzero(sampling_probs(logits, SamplingParams(0, 0, 1, 0, samplers=("top_k",)))) == 4


def test_a_tiny_temperature_is_greedy_in_the_limit():
    probs = sampling_probs(LOGITS, SamplingParams(1e-38, **OFF))  # logits / 1e-38 overflow float32
    np.testing.assert_array_equal(probs, np.eye(LOGITS.size)[1])


def test_repeat_penalty_ctrl_rule():
    logits = np.array([2.0, -2.0, 1.0, 0.5], dtype=np.float32)
    probs = sampling_probs(logits, SamplingParams(1.0, 0, 1.0, 0.0, 2.0, samplers=("penalties",)), [0, 1, 1])
    np.testing.assert_allclose(probs, softmax64(np.array([1.0, -4.0, 1.0, 0.5])), rtol=1e-12)


def test_frequency_and_presence_penalties_subtract_per_occurrence_and_once():
    # token 1 twice, token 0 once: z - c * frequency - presence, after the CTRL penalty
    logits = np.array([2.0, -2.0, 1.0, 0.5], dtype=np.float32)
    params = SamplingParams(1.0, 0, 1.0, 0.0, 2.0, samplers=("penalties",), frequency_penalty=0.5, presence_penalty=0.25)
    probs = sampling_probs(logits, params, [0, 1, 1])
    np.testing.assert_allclose(probs, softmax64(np.array([1.0 - 0.75, -4.0 - 1.25, 1.0, 0.5])), rtol=1e-12)


# float32 weights exactly 1, 1/2, 1/4, 1/8, 1/16, 3/64, 1/64 (sum 2): the most typical tokens are those
# of probability 1/4, 1/2, 1/8, 1/16, ... (entropy 1.36 nats), masses .25, .75, .875, .9375 exact.
EXACT = np.log(np.array([1, 0.5, 0.25, 0.125, 0.0625, 0.046875, 0.015625])).astype(np.float32)


@pytest.mark.parametrize("p,kept", [(0.0, {1}), (0.2, {1}), (0.25, {1, 0}), (0.5, {1, 0}), (0.75, {1, 0, 2}),
                                    (0.7499999, {1, 0}), (0.875, {1, 0, 2, 3}), (0.999, set(range(7)))])
def test_typical_keeps_the_most_typical_until_their_mass_exceeds_p(p, kept):
    # Strictly exceeds: at an exact boundary the token after it is kept too (top-p stops there).
    probs = sampling_probs(EXACT, SamplingParams(1.0, 0, 1.0, 0.0, samplers=("typ_p",), typical_p=p))
    assert set(np.flatnonzero(probs)) == kept


def test_typical_can_drop_the_most_probable_token_even_when_greedy():
    # p(.5) is less typical than p(.25): with typical .2 only the .25 token is left, and temperature 0
    # after it picks it, not the argmax of the logits.
    params = SamplingParams(0.0, 0, 1.0, 0.0, samplers=("typ_p", "temperature"), typical_p=0.2)
    assert sample(EXACT, params, np.random.default_rng(0)) == 1


def test_top_n_sigma_keeps_logits_within_n_standard_deviations_of_the_largest():
    logits = np.array([0.0, 1.0, 2.0, 3.0, 10.0, -np.inf], dtype=np.float32)  # -inf: not in the statistics
    sigma = np.std([0.0, 1.0, 2.0, 3.0, 10.0])  # 3.54
    for n in (0.5, 2.0, 2.5, 3.0):
        probs = sampling_probs(logits, SamplingParams(1.0, 0, 1.0, 0.0, samplers=("top_n_sigma",), top_n_sigma=n))
        assert set(np.flatnonzero(probs)) == set(np.flatnonzero(logits >= 10 - n * sigma)), n
    off = SamplingParams(1.0, 0, 1.0, 0.0, samplers=("top_n_sigma",), top_n_sigma=0.0)
    assert np.count_nonzero(sampling_probs(logits, off)) == 5


def test_xtc_drops_the_likely_tokens_but_the_least_when_its_draw_is_at_most_its_probability():
    # probabilities .5 .25 .125 ...: threshold .2 -> .5 and .25 reach it, .5 goes; threshold .3 -> only .5: nothing
    params = SamplingParams(1.0, 0, 1.0, 0.0, samplers=("xtc",), xtc_probability=0.5, xtc_threshold=0.2)
    assert set(np.flatnonzero(sampling_probs(EXACT, params, xtc_draw=0.5))) == set(range(1, 7))
    assert np.count_nonzero(sampling_probs(EXACT, params, xtc_draw=0.51)) == 7  # the draw above: no XTC
    assert np.count_nonzero(sampling_probs(EXACT, params)) == 7  # no draw: no XTC
    higher = SamplingParams(1.0, 0, 1.0, 0.0, samplers=("xtc",), xtc_probability=1.0, xtc_threshold=0.3)
    assert np.count_nonzero(sampling_probs(EXACT, higher, xtc_draw=0.0)) == 7
    # Greedy after XTC picks the most probable survivor, not the argmax.
    greedy = SamplingParams(0.0, 0, 1.0, 0.0, samplers=("xtc", "temperature"), xtc_probability=1.0, xtc_threshold=0.2)
    assert sample(EXACT, greedy, np.random.default_rng(0)) == 1


def test_dry_penalises_the_token_that_would_extend_a_repeat():
    # history a b c x a b c: x would make "a b c" a repeat of length 4 > allowed 2:
    # penalty 0.8 * 1.75 ** (3 - 2) on x; a token that extends nothing keeps its logit
    logits = np.zeros(8, dtype=np.float32)
    params = SamplingParams(1.0, 0, 1.0, 0.0, samplers=("dry",), dry_multiplier=0.8, dry_sequence_breakers=())
    ids, z = survivors(logits, params, [1, 2, 3, 7, 1, 2, 3])
    np.testing.assert_array_equal(z, np.where(np.arange(8) == 7, np.float32(-0.8 * 1.75), 0).astype(np.float32))
    # 7 would extend a repeat of 5 (1 2 5 3 4), but a breaker (id 5, a single-token breaker) two ids
    # before the end limits it to 2: penalty 0.8 * 1.75 ** 0 instead of 0.8 * 1.75 ** 3
    history = [1, 2, 5, 3, 4, 7, 1, 2, 5, 3, 4]
    assert survivors(logits, params, history)[1][7] == np.float32(-0.8 * 1.75 ** 3)
    breaker = DryBreakers(("?",), {5: ((),)})
    with_breaker = SamplingParams(1.0, 0, 1.0, 0.0, samplers=("dry",), dry_multiplier=0.8, dry_breaker_ids=breaker)
    assert survivors(logits, with_breaker, history)[1][7] == np.float32(-0.8)
    # and with only one id after it, below the allowed length: no penalty at all
    assert not survivors(logits, with_breaker, history[:-1] + [5, 4])[1].any()
    # breakers given as text but not as ids: refused, not ignored
    with pytest.raises(ParameterError, match="SamplingParams.for_tokenizer") as e:
        survivors(logits, SamplingParams(samplers=("dry",), dry_multiplier=0.8), [1, 2, 3, 7, 1, 2, 3])
    assert e.value.parameter == "dry_sequence_breakers"


def test_dry_breakers_are_found_in_the_vocabulary_as_llama_cpp_finds_them():
    tok = llama3_tokenizer()
    breakers = dry_breakers(tok, ["\n", " the end"])
    newline, colon_newline = tok.encode("\n", bos=False), tok.encode(":\n", bos=False)
    assert breakers.single(newline[0]) and breakers.single(colon_newline[0])  # its text holds "\n"
    # " the" ends with the start of " the end": head " the", tail the tokens of " end"
    head = tok.encode(" the", bos=False)[0]
    assert tuple(tok.encode(" end", bos=False)) in breakers.heads[head] and not breakers.single(head)
    with pytest.raises(ParameterError, match="1 to 40 bytes") as e:
        dry_breakers(tok, ["x" * 41])
    assert e.value.parameter == "dry_sequence_breakers"


def test_top_p_on_a_large_vocabulary_finds_its_cut_beyond_the_first_look():
    # A flat 50,000-token tail: top-p .95 needs far more than the 256 largest.
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(50_000) * 0.1).astype(np.float32)
    probs = sampling_probs(logits, SamplingParams(1.0, 0, 0.95, 0.0))
    order = np.lexsort((np.arange(logits.size), -logits))
    mass = np.cumsum(softmax64(logits.astype(np.float64))[order])
    n = int(np.searchsorted(mass, 0.95)) + 1
    assert n > 256 and set(np.flatnonzero(probs)) == set(order[:n].tolist())


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


# --- properties --------------------------------------------------------------------------------

LOGIT_VECTORS = st.lists(st.floats(-30, 30, width=32), min_size=2, max_size=60).map(
    lambda z: np.array(z, dtype=np.float32))
# any order of any subset of the samplers
ORDERS = st.permutations(SAMPLER_NAMES).flatmap(lambda names: st.integers(0, len(names)).map(lambda n: names[:n]))


@settings(max_examples=300, deadline=None)
@given(LOGIT_VECTORS, st.floats(0.0, 3), st.integers(0, 70), st.floats(0.01, 1.0), st.floats(0, 0.99),
       st.floats(0.5, 2), ORDERS, st.lists(st.integers(0, 59), max_size=8),
       st.fixed_dictionaries({"typical_p": st.floats(0, 1), "top_n_sigma": st.floats(-1, 4),
                              "frequency_penalty": st.floats(-2, 2), "presence_penalty": st.floats(-2, 2)}))
def test_each_filter_only_removes_tokens_and_the_result_is_a_distribution(z, temp, k, top_p, min_p, penalty,
                                                                          order, recent, more):
    order = tuple(order)
    full = SamplingParams(temp, k, top_p, min_p, penalty, samplers=order, **more)
    probs = sampling_probs(z, full, recent)
    assert abs(probs.sum() - 1) < 1e-9 and np.all(probs >= 0)
    kept = set(np.flatnonzero(probs))
    assert kept
    # Each prefix of the chain keeps a superset of what the longer chain keeps.
    before = set(range(z.size))
    for n in range(len(order) + 1):
        ids, _ = survivors(z, SamplingParams(temp, k, top_p, min_p, penalty, samplers=order[:n], **more), recent)
        now = set(ids.tolist())
        assert now <= before
        before = now
    assert kept <= before
    if k and "top_k" in order:
        assert len(kept) <= k


# --- parameters --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,parameter", [
    (dict(temperature=-0.1), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(min_p=1.0), "min_p"), (dict(repeat_penalty=0), "repeat_penalty"),
    (dict(temperature=float("nan")), "temperature"), (dict(samplers=("top_k", "top_k")), "samplers"),
    (dict(presence_penalty=float("nan")), "presence_penalty"), (dict(frequency_penalty=float("inf")), "frequency_penalty"),
    (dict(typical_p=1.5), "typical_p"), (dict(typical_p=-0.1), "typical_p"), (dict(top_n_sigma=float("nan")), "top_n_sigma"),
    (dict(repeat_penalty=1e-40), "repeat_penalty"), (dict(repeat_last_n=-2), "repeat_last_n"),
    (dict(dry_multiplier=-1), "dry_multiplier"), (dict(dry_base=0.5), "dry_base"),
    (dict(dry_allowed_length=-1), "dry_allowed_length"), (dict(dry_penalty_last_n=-2), "dry_penalty_last_n"),
    (dict(dry_sequence_breakers=("\n", "")), "dry_sequence_breakers"), (dict(xtc_probability=1.5), "xtc_probability"),
    (dict(xtc_threshold=-0.1), "xtc_threshold"),
])
def test_invalid_values_are_rejected_naming_the_parameter(kwargs, parameter):
    with pytest.raises(ParameterError, match=parameter) as e:
        SamplingParams(**kwargs)
    assert e.value.parameter == parameter


def test_parse_samplers_takes_llama_cpp_names_and_the_order_presets():
    assert parse_samplers("top_k;top_p;min_p;temperature") == ("top_k", "top_p", "min_p", "temperature")
    assert parse_samplers("top-k;nucleus;min-p;temp") == ("top_k", "top_p", "min_p", "temperature")
    assert parse_samplers("llama.cpp") == DEFAULT_SAMPLERS == (
        "penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature")
    # llama.cpp's other spellings (`common_sampler_types_from_names`), in any case
    assert parse_samplers("Top-N-Sigma;TOPK;typ;typ-p".replace(";typ-p", "")) == ("top_n_sigma", "top_k", "typ_p")
    assert parse_samplers("typp;topnsigma") == ("typ_p", "top_n_sigma")
    # --sampling-seq: llama.cpp's letters
    assert parse_sampler_chars("edskypmxt") == DEFAULT_SAMPLERS
    assert parse_sampler_chars("kt") == ("top_k", "temperature")
    assert parse_samplers("transformers") == ("penalties", "temperature", "top_k", "top_p", "min_p")
    assert parse_samplers("") == ()


@pytest.mark.parametrize("text,fragment", [
    ("foo", "unknown sampler 'foo'"), ("top_k;top_k", "'top_k' is given twice"),
    ("top_k;top-k", "'top_k' is given twice"), ("adaptive-p;top_k", "'adaptive-p' is llama.cpp's but not implemented"),
    ("top_k;;top_p", "empty sampler name"), ("typical", "unknown sampler 'typical'"),
    ("infill", "'infill' is llama.cpp's but not implemented"),
])
def test_parse_samplers_refuses_unknown_and_duplicate_names(text, fragment):
    with pytest.raises(ParameterError, match=fragment) as e:
        parse_samplers(text)
    assert e.value.parameter == "samplers"


@pytest.mark.parametrize("text,fragment", [("kz", "unknown sampler 'z'"), ("kk", "'top_k' is given twice"),
                                           ("ai", "'a' is llama.cpp's but not implemented")])
def test_parse_sampler_chars_refuses_unknown_and_duplicate_letters(text, fragment):
    with pytest.raises(ParameterError, match=fragment) as e:
        parse_sampler_chars(text)
    assert e.value.parameter == "samplers"


def test_a_temperature_that_overflows_every_logit_leaves_the_largest_sharing_the_mass():
    # 1e-45 (float32's smallest subnormal) sends -1 / t to -inf for every token: the limit of the
    # distribution as t -> 0 is the largest logits sharing the mass, not NaN.
    tiny = 1.401298464324817e-45
    for logits, expected in (([-1, -1], [0.5, 0.5]), ([-1, -2], [1, 0]), ([3, 1, 3], [0.5, 0, 0.5])):
        for order in ("llama.cpp", "transformers"):
            params = SamplingParams(temperature=tiny, samplers=parse_samplers(order))
            probs = sampling_probs(np.array(logits, dtype=np.float32), params)
            assert np.array_equal(probs, expected), f"{logits} ({order}): {probs}"
