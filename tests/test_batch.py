"""Batches (`model.forward_batch`): several sequences in one pass, each with its own KV cache and
positions, give each sequence the logits it has alone: within float32 rounding by default (a
weight product's kernel depends on how many rows it multiplies), bit for bit with batch-invariant
products (`products.set_batch_invariant`), and the same greedy ids either way. No padding enters
the pass, so a sequence's companions (their number, lengths and contents) never change its result.
docs/DESIGN.md, "Batches", gives the measured figures (tools/measure_batch_invariance.py)."""

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from llama3_np import Llama3Error, products
from llama3_np.assets import default_model
from llama3_np.errors import ParameterError
from llama3_np.formats.checkpoint import load_checkpoint
from llama3_np.generation import Session, generate_batch
from llama3_np.model import KVCache, forward, forward_batch
from tests.helpers import nmse, random_weights, tiny_config

# Batch against alone on the default model (30 layers): the bound over the logits of every prefill and
# decode step, above the worst measured on two CPUs' kernels (docs/DESIGN.md, "Batches", measured by
# tools/measure_batch_invariance.py) and three times below compare's float32 tolerance of two implementations.
BATCH_NMSE = 1e-9

PROMPTS = [[5, 17, 99, 3, 64, 64, 12], [127, 0], [41, 8, 77, 3, 3, 9, 100, 101, 102, 1, 2, 60, 33], [7]]


@pytest.fixture
def invariant():
    products.set_batch_invariant(True)
    yield
    products.set_batch_invariant(False)


def greedy_alone(weights, config, prompt, steps, compute="float32"):
    """The logits of a prompt and of `steps` greedy tokens after it, one sequence at a time."""
    cache = KVCache(config, len(prompt) + steps, compute)
    logits = [forward(weights, config, prompt, cache)]
    for _ in range(steps):
        logits.append(forward(weights, config, [int(np.argmax(logits[-1][-1]))], cache))
    return logits


def greedy_batched(weights, config, prompts, steps, compute="float32"):
    """The same for every prompt at once: one `forward_batch` per step for all of them."""
    caches = [KVCache(config, len(p) + steps, compute) for p in prompts]
    logits = [forward_batch(weights, config, prompts, caches)]
    for _ in range(steps):
        logits.append(forward_batch(weights, config, [[int(np.argmax(x[-1]))] for x in logits[-1]], caches))
    return [[step[b] for step in logits] for b in range(len(prompts))]  # per sequence, per step


def worst_nmse(batched, alone):
    return max(nmse(b, a) for b, a in zip(batched, alone))


def split_config():
    """Products large enough for every path of `products.linear` at PROMPTS' rows: the output
    product ([4096, 256]) splits over threads in blocks from 4 rows on (T·n_out·n_in ≥
    SPLIT_MIN_MACS), the feed-forward ones at the prefill's 23 rows, the attention ones never."""
    config = tiny_config(dim=256, ffn_dim=768, vocab_size=4096)
    assert len(PROMPTS) * config.vocab_size * config.dim >= products.SPLIT_MIN_MACS
    assert len(PROMPTS) * config.dim * config.dim < products.SPLIT_MIN_MACS
    return config


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("make_config", [tiny_config, split_config])
def test_a_batch_gives_each_sequence_its_logits_alone(dtype, threads, make_config):
    """The decode steps' 4 rows and the prefill's 23 are the products' several-row kernel
    ((w · xᵀ)ᵀ, up to products.TRANSPOSED_MAX_ROWS rows), one row alone the matrix-vector one."""
    config = make_config()
    assert 1 < len(PROMPTS) and sum(map(len, PROMPTS)) <= products.TRANSPOSED_MAX_ROWS
    w = random_weights(config, dtype=dtype)
    before = products.get_threads()
    products.set_threads(threads)
    try:
        batched = greedy_batched(w, config, PROMPTS, 6)
        for b, prompt in enumerate(PROMPTS):
            alone = greedy_alone(w, config, prompt, 6)
            e = worst_nmse(batched[b], alone)
            assert e <= BATCH_NMSE, f"sequence {b}: NMSE {e:.3e} > {BATCH_NMSE:.0e}"
            ids = [[int(np.argmax(x[-1]))] for x in batched[b]], [[int(np.argmax(x[-1]))] for x in alone]
            assert ids[0] == ids[1], f"sequence {b}: greedy ids {ids[0]} batched, {ids[1]} alone"
    finally:
        products.set_threads(before)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("threads", [1, 2])
def test_batch_invariant_products_give_each_sequence_its_logits_alone_bit_for_bit(invariant, dtype, threads):
    config = split_config()
    w = random_weights(config, dtype=dtype)
    before = products.get_threads()
    products.set_threads(threads)
    try:
        batched = greedy_batched(w, config, PROMPTS, 5)
        for b, prompt in enumerate(PROMPTS):
            for step, (x, y) in enumerate(zip(batched[b], greedy_alone(w, config, prompt, 5))):
                assert np.array_equal(x, y), f"sequence {b}, step {step}: NMSE {nmse(x, y):.3e}, not bit-equal"
    finally:
        products.set_threads(before)


# Batches around a sequence (None), in the forms padding takes in a padded batch: longer and
# shorter companions, more or fewer of them, the sequence first, in the middle, last, repeated.
# The first batch has more rows than products.TRANSPOSED_MAX_ROWS (x · wᵀ), the others and the
# sequence alone fewer ((w · xᵀ)ᵀ): a sequence's rows go through both multi-row kernels.
AROUND = [[None, [1] * 90], [[3, 4], None], [[9] * 3, [2] * 25, None, [7]], [None] * 3]


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("on", [False, True], ids=["default", "batch-invariant"])
def test_companions_never_change_a_sequence(dtype, on):
    """What padding would change in a padded batch (the other sequences' number, lengths and
    contents, a sequence's place in the batch) changes a sequence's logits only within the bound by
    default, never its greedy ids, and not at all, bit for bit, with batch-invariant products.
    Nothing else can change: no pad token or mask enters, a sequence's rows are its own tokens."""
    config = tiny_config()
    w = random_weights(config, dtype=dtype)
    target = PROMPTS[0]
    assert sum(len(c or target) for c in AROUND[0]) > products.TRANSPOSED_MAX_ROWS >= len(target) > 1
    products.set_batch_invariant(on)
    try:
        alone = forward(w, config, target)
        for around in AROUND:
            batch = [target if c is None else c for c in around]
            at = around.index(None)
            got = forward_batch(w, config, batch)[at]
            if on:
                assert np.array_equal(got, alone), f"{len(batch)} sequences"
            else:
                assert nmse(got, alone) <= BATCH_NMSE, f"{len(batch)} sequences: NMSE {nmse(got, alone):.3e}"
                assert np.array_equal(np.argmax(got, axis=-1), np.argmax(alone, axis=-1))
    finally:
        products.set_batch_invariant(False)


def test_each_sequence_keeps_its_own_positions_and_cache():
    """Sequences at different points of their caches, one of them at a rope position of its own
    choosing, batched: each equals forward on its own cache at its own position."""
    config = tiny_config()
    w = random_weights(config)
    caches = [KVCache(config, 32) for _ in range(3)]
    own = [KVCache(config, 32) for _ in range(3)]
    for c, o, head in zip(caches, own, ([1, 2, 3], [], [4] * 9)):
        if head:
            forward(w, config, head, c), forward(w, config, head, o)
    positions = [3, 1000, 9]
    got = forward_batch(w, config, [[10, 11], [12], [13, 14, 15]], caches, positions, last_only=True)
    for b, (tokens, o, p) in enumerate(zip([[10, 11], [12], [13, 14, 15]], own, positions)):
        want = forward(w, config, tokens, o, pos=p, last_only=True)
        assert got[b].shape == (1, config.vocab_size)
        assert nmse(got[b], want) <= BATCH_NMSE and caches[b].length == o.length


def test_bad_batches_are_clear_errors():
    config = tiny_config()
    w = random_weights(config)
    with pytest.raises(Llama3Error, match="a batch needs at least one sequence"):
        forward_batch(w, config, [])
    with pytest.raises(Llama3Error, match="a batch of 2 sequences needs one KV cache and one position each"):
        forward_batch(w, config, [[1], [2]], [KVCache(config, 4)])
    with pytest.raises(Llama3Error, match="sequence 1 of the batch: the KV cache holds 0 of 2 tokens; 3 more"):
        forward_batch(w, config, [[1], [2, 3, 4]], [KVCache(config, 4), KVCache(config, 2)])
    with pytest.raises(Llama3Error, match="sequence 0 of the batch: token id 128 is outside"):
        forward_batch(w, config, [[128], [2]])
    with pytest.raises(ParameterError, match="sequence 1's KV cache was made for 'float64'"):
        forward_batch(w, config, [[1], [2]], [KVCache(config, 4), KVCache(config, 4, "float64")])


@pytest.fixture(scope="module")
def smollm2():
    return load_checkpoint(default_model(), dtype="float32")


def test_the_default_model_batched_equals_alone_within_the_bound_and_greedy_ids_match(smollm2):
    cases = json.loads((Path(__file__).parent / "fixtures" / "default_model" / "greedy.json").read_text())["cases"]
    prompts = [c["prompt_ids"] for c in cases]
    config, w = smollm2.config, smollm2.weights
    batched = greedy_batched(w, config, prompts, 4)
    for b, prompt in enumerate(prompts):
        alone = greedy_alone(w, config, prompt, 4)
        e = worst_nmse(batched[b], alone)
        assert e <= BATCH_NMSE, f"prompt {b}: NMSE {e:.3e} > {BATCH_NMSE:.0e}"
        assert [int(np.argmax(x[-1])) for x in batched[b]] == [int(np.argmax(x[-1])) for x in alone]
        assert [int(np.argmax(x[-1])) for x in alone[:-1]] == cases[b]["ids"][:4]


def test_generate_batch_gives_each_generation_its_run_alone_in_input_order():
    """Five generations, two at a time: different limits and a stop id make them end at different
    steps, so later ones join while earlier ones decode (continuous batching); each gives the ids
    and stop reason of its run alone, and they come out in input order."""
    config = tiny_config()
    w = random_weights(config)
    prompts = PROMPTS + [[60] * 300]  # the last one is fed in two chunks (PREFILL_CHUNK 256)
    limits = [7, 2, 0, 9, 3]  # 0: the prompt only

    def generations():
        for prompt, limit in zip(prompts, limits):
            yield Session(w, config, 400).generate(prompt, max_new=limit, stop_ids=[77])

    alone = [g.run() for g in generations()]
    seen = []
    batched = list(generate_batch(generations(), 2, on_step=lambda i, step: seen.append(i) and False))
    assert [g.prompt_ids for g in batched] == [g.prompt_ids for g in alone]
    assert [(g.ids, g.stop_reason) for g in batched] == [(g.ids, g.stop_reason) for g in alone]
    assert [g.session.history for g in batched] == [g.session.history for g in alone]
    assert seen != sorted(seen), "the generations did not overlap"


def test_generate_batch_refuses_a_parallel_that_is_not_a_positive_integer():
    config = tiny_config()
    w = random_weights(config)
    for parallel in (0, -1, 1.5, True):
        with pytest.raises(ParameterError, match="parallel must be an integer >= 1"):
            list(generate_batch([Session(w, config, 8).generate([1])], parallel))
