"""The embedded default model (SmolLM2-135M-Instruct, read from its Q4_1 GGUF with the file's exact
values) continues three prompts exactly as Hugging Face transformers does in float32 on the same values: 64 greedy tokens
each, from tests/fixtures/default_model/greedy.json (tools/make_default_model_reference.py).
Exact token ids hold on any CPU: the smallest top-1 margin recorded is 0.016 logits, about a
thousand times the float32 difference between the two implementations. In compute mode llamacpp
it chooses llama.cpp's own greedy tokens on the same file up to a near tie.

In bfloat16 and float16 compute modes it is held to the greedy continuations of transformers
and llama-models in those dtypes over 20 prompts (tests/fixtures/default_model/
greedy_low_precision.json, tools/make_precision_reference.py). There logits often tie (bfloat16
logits near 10 are 1/16 apart), and over 30 layers a float32 sum in another order than torch's
moves the roundings of every later stage, so the emulation parts from the engine on many prompts
(BENCHMARKS.md, "Compute modes"). Which prompts part depends on the CPU's BLAS kernel, so the test
holds each parting to a near-tie of the engine's own logits and the number that agree to a floor
below what every kernel measured."""

import json
from pathlib import Path

import numpy as np
import pytest

from llama3_np.assets import DEFAULT_MODEL_SHA256, default_model
from llama3_np.config import ComputeMode
from llama3_np.formats.checkpoint import load_checkpoint
from llama3_np.linear import mode_weights
from llama3_np.load import load_model
from llama3_np.model import KVCache, forward

# llama.cpp quantizes each activation row to 8 bits (Q8_0) before its products with the file's
# quantized weights (llama3_np computes with the exact values); on this model that moves a logit by
# up to about this much, so its greedy continuation parts from the exact one only at a closer race.
# Measured on the committed prompts: they part at top-two margins of 0.18, 0.009 and 0.04.
LLAMA_CPP_MARGIN = 0.2

REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "default_model" / "greedy.json").read_text())


@pytest.fixture(scope="module")
def smollm2():
    assert REFERENCE["model"]["sha256"] == DEFAULT_MODEL_SHA256, "the fixture is of another file"
    return load_checkpoint(default_model(), dtype="float32")  # default_model() checks the file's sha256


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=["text", "chat", "digits"])
def test_greedy_continuation_matches_transformers_float32(smollm2, case):
    config, weights = smollm2.config, smollm2.weights
    prompt = case["prompt_ids"]
    cache = KVCache(config, len(prompt) + len(case["ids"]))
    logits = forward(weights, config, prompt, cache=cache, pos=0, last_only=True)[-1]
    ids = []
    for step, want in enumerate(case["ids"]):
        top2 = np.argsort(logits)[-2:][::-1]
        ids.append(int(top2[0]))
        assert ids[-1] == want, (
            f"token {step}: llama3_np chose {ids[-1]}, transformers {want} (our margin "
            f"{logits[top2[0]] - logits[top2[1]]:.4f}, theirs {case['margins'][step]:.4f}); agreed on {ids[:-1]}")
        logits = forward(weights, config, [want], cache=cache, pos=len(prompt) + step, last_only=True)[-1]
    assert len(ids) >= 32


@pytest.fixture(scope="module")
def smollm2_llamacpp():
    return load_model(default_model(), compute="llamacpp")  # the file's own Q4_1 blocks


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=["text", "chat", "digits"])
def test_compute_llamacpp_chooses_llama_cpps_greedy_tokens_until_a_near_tie(smollm2_llamacpp, case):
    """Compute mode llamacpp on the default model's Q4_1 file against llama.cpp's own greedy
    continuation of it (`llama_cpp_ids`, tools/make_default_model_reference.py), fed llama.cpp's
    ids in one pass: at every position it chooses llama.cpp's next token up to the first where the
    two part, and there they race: the exact margin between them (the fixture's, transformers in
    float32 on the same history) is below LLAMA_CPP_MARGIN, as is llama3_np's own; so is llama3_np's
    at any later position where it chooses another token than llama.cpp's. Run freely, llama.cpp's
    arithmetic moves a deep model's logits as far as exact math's do (docs/DESIGN.md, "Numerical
    facts"), hence the same bound.
    Measured on the committed prompts: "text" chooses all 64 of llama.cpp's tokens, "chat" 63 (it
    parts at token 7, exact margin 0.0086, ours 0.0090), "digits" 63 (at token 60, exact margin
    0.039, ours 0.063); both part where the exact continuation parts from llama.cpp's. Decoded one
    token at a time instead, as llama.cpp decoded them, the "text" prompt
    parts at token 8, "chat" agrees on all 64 and "digits" parts at token 60."""
    loaded, prompt, theirs = smollm2_llamacpp, case["prompt_ids"], case["llama_cpp_ids"]
    logits = forward(loaded.weights, loaded.config, prompt + theirs[:-1], compute=loaded.compute)  # [P+63, V]
    logits = logits[len(prompt) - 1:]  # [64, V]: row k chooses token k of the continuation
    ours = [int(i) for i in logits.argmax(axis=-1)]
    races = {k: float(logits[k, a] - logits[k, b]) for k, (a, b) in enumerate(zip(ours, theirs)) if a != b}
    assert all(race < LLAMA_CPP_MARGIN for race in races.values()), f"llama.cpp's token trails ours by {races}"
    part = min(races, default=None)
    exact_part = next((k for k, (a, b) in enumerate(zip(case["ids"], theirs)) if a != b), len(theirs))
    if part is not None and part <= exact_part:  # the same history as the exact continuation's
        assert case["margins"][part] < LLAMA_CPP_MARGIN, (
            f"llama3_np parts from llama.cpp at token {part}, where the exact margin is {case['margins'][part]}")


# ---------------------------------------------------------------------------------------------
# Compute modes against the engines they emulate (tools/make_precision_reference.py): 20 prompts,
# 64 greedy tokens each, from transformers in bfloat16 and float16 and llama-models in bfloat16.

LOW = json.loads((Path(__file__).parent / "fixtures" / "default_model" / "greedy_low_precision.json").read_text())
MODES = {"hf_bf16": ComputeMode("bfloat16"), "hf_fp16": ComputeMode("float16"),
         "meta_bf16": ComputeMode("bfloat16", "meta")}
# How many of the 20 prompts continue exactly as the engine did over all 64 tokens: far from the 19
# hoped for in bfloat16, because of the spreading described in the module docstring. Which prompts
# part moves with the order of float32 sums, that is with OpenBLAS's kernel for the CPU: measured
# (running this test with OPENBLAS_CORETYPE set) 7, 6 and 17 with SkylakeX's kernels (AVX-512), 6, 5
# and 18 with Haswell's (what Zen 2/3 machines get); the floors sit below both. Every parting is
# at a near-tie of the engine's own top two logits: most at a tie (margin 0), the widest measured
# 0.25 in bfloat16 and 0.023 in float16 (both kernels); NEAR_TIE allows four of the dtype's steps
# at logits in [16, 32) (0.125 and 1/64 each), a margin that 21% (bfloat16) and 3% (float16) of the
# engines' 1,280 recorded tokens have, so a mode that parts for any other reason fails at once.
AGREEING = {"hf_bf16": 4, "meta_bf16": 3, "hf_fp16": 15}
NEAR_TIE = {"bfloat16": 0.5, "float16": 1 / 16}


@pytest.fixture(scope="module")
def smollm2_float32():
    assert LOW["model"]["sha256"] == DEFAULT_MODEL_SHA256, "the fixture is of another file"
    return load_checkpoint(default_model(), dtype="float32")  # the exact values; mode_weights rounds them


def teacher_forced(weights, config, mode, prompt, ids) -> np.ndarray:  # -> [65, V]
    """Logits at the prompt's last token and at each of `ids` fed after it, in one forward pass:
    while the continuation agrees, greedy decoding computes these same rows (up to the order of
    float32 sums), so the first row whose argmax differs is where greedy decoding would part."""
    cache = KVCache(config, len(prompt) + len(ids), mode)
    return forward(weights, config, prompt + ids, cache)[len(prompt) - 1:]


@pytest.mark.parametrize("producer", list(MODES))
def test_greedy_continuations_follow_the_engines_in_their_dtype_as_measured(smollm2_float32, producer):
    mode = MODES[producer]
    weights = mode_weights(smollm2_float32.weights, mode)
    differ, margins = [], []
    for prompt, case in zip(LOW["prompts"], LOW["producers"][producer]["cases"]):
        ours = np.argmax(teacher_forced(weights, smollm2_float32.config, mode, prompt["prompt_ids"], case["ids"]), axis=-1)
        wrong = np.flatnonzero(ours[:-1] != case["ids"])
        if wrong.size:
            i = int(wrong[0])
            margins.append(case["margins"][i])
            differ.append(f"{prompt['name']} at token {i} (ours {ours[i]}, theirs {case['ids'][i]}, "
                          f"their margin {case['margins'][i]})")
    print(f"{mode.name} vs {producer}: {len(LOW['prompts']) - len(differ)} of {len(LOW['prompts'])} agree; "
          + "; ".join(differ))
    assert len(LOW["prompts"]) - len(differ) >= AGREEING[producer], (
        f"{mode.name}: {len(differ)} of {len(LOW['prompts'])} prompts part from {producer}: " + "; ".join(differ))
    assert max(margins, default=0) <= NEAR_TIE[mode.dtype], (
        f"{mode.name} parts from {producer} where its margin exceeds {NEAR_TIE[mode.dtype]}: " + "; ".join(differ))
