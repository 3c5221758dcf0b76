"""How the work is cut, not what it computes: a prompt fed in chunks gives the logits of one forward
pass (the weight products' blocks and threads: tests/test_products.py)."""

import numpy as np
import pytest

from tests.helpers import assert_close


@pytest.mark.parametrize("chunk", [1, 4, 5, 64])
def test_a_prompt_fed_in_chunks_gives_the_logits_of_one_forward(monkeypatch, chunk):
    from llama3_np import generation
    from llama3_np.model import forward
    from tests.helpers import random_weights, tiny_config

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
