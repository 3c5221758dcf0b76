"""The same tiny checkpoint in every format gives the same logits, in both residencies.

tests/formats/test_checkpoint_formats.py proves the canonical weights equal; this runs them through
`model.forward`, at position 0 and far beyond the original context (where the rope scaling
recovered from each format's config matters). Equality is exact because both sides run the same
code on the same float32 weights in one process: the same kernels, whatever the CPU."""

import numpy as np
import pytest

from llama3_np.formats.checkpoint import load_checkpoint
from llama3_np.model import forward
from tests.helpers import nmse
from tests.formats.test_checkpoint_formats import FIXTURES, LOSSLESS, _folder, imported  # noqa: F401 (a fixture)

TOKENS = [1, 17, 120, 5, 99, 64, 3, 127, 42, 0, 88, 121]
POSITIONS = [0, 20000]


@pytest.fixture(scope="module")
def reference_logits():
    ckpt = load_checkpoint(FIXTURES / "meta", dtype="float32")
    return {pos: forward(ckpt.weights, ckpt.config, TOKENS, pos=pos) for pos in POSITIONS}


@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_formats_give_identical_logits(name, imported, reference_logits):  # noqa: F811
    ckpt = load_checkpoint(_folder(name, imported), dtype="float32")
    for pos in POSITIONS:
        logits = forward(ckpt.weights, ckpt.config, TOKENS, pos=pos)
        assert np.array_equal(logits, reference_logits[pos]), \
            f"{name} at position {pos}: NMSE {nmse(logits, reference_logits[pos]):.3e} against the Meta checkpoint"


@pytest.mark.parametrize("name", ["hf", "meta", "meta_2shards"])
def test_bfloat16_residency_gives_the_float32_logits(name, reference_logits):
    ckpt = load_checkpoint(FIXTURES / name, dtype="bfloat16")
    for pos in POSITIONS:
        logits = forward(ckpt.weights, ckpt.config, TOKENS, pos=pos)
        e = nmse(logits, reference_logits[pos])
        assert e <= 1e-10, f"{name} at position {pos}: NMSE {e:.3e} between bfloat16 and float32 residency"


def test_q8_0_logits_are_close_but_not_equal(imported, reference_logits):  # noqa: F811
    ckpt = load_checkpoint(imported["gguf_q8_0.gguf"], dtype="float32")
    for pos in POSITIONS:
        e = nmse(forward(ckpt.weights, ckpt.config, TOKENS, pos=pos), reference_logits[pos])
        assert 0 < e <= 1e-3, f"Q8_0 at position {pos}: NMSE {e:.3e}"
