#!/usr/bin/env python3
"""Write tests/fixtures/sampling/chains.json.gz: the distributions two reference samplers draw from,
for a grid of settings on a few logit vectors; and tests/fixtures/sampling/llama_cpp_samplers.json.gz:
llama.cpp's other samplers (frequency and presence penalties, typical, top-n-sigma), each alone
and in llama.cpp's default chain.

    python tools/make_sampler_fixtures.py      (needs `make tools`: transformers, llama-cpp-python)

- llama.cpp (llama-cpp-python's low-level `llama_sampler_*` API, no model): a sampler chain in
  llama.cpp's default order, penalties, top-k, top-p, min-p, temperature, then `dist`, as
  `common/sampling.cpp` `common_sampler_init` builds it (`llama_sampler_init_penalties`,
  `_top_k`, `_top_p(p, min_keep 0)`, `_min_p(p, min_keep 0)`, `_temp_ext(t, 0, 1)`, `_dist`),
  applied to a `llama_token_data_array` made from the logits, the window's ids accepted first.
  The distribution is the `p` that `dist` leaves on the surviving candidates.
- transformers: the logits processors `GenerationMixin._get_logits_processor` builds for
  `generate(do_sample=True)`, in its order: RepetitionPenaltyLogitsProcessor,
  TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper (each added under
  the same conditions as there), then the softmax `_sample` draws from. Temperature 0 is
  `do_sample=False`: the argmax of the penalised logits.

Logit vectors: two small ones whose float32 softmax is exact in binary (weights 1, 1/2, 1/4, ...
summing to a power of two over the whole vocabulary, or over its top 4), so that top-p and min-p
meet their boundary exactly in the references' arithmetic; two random ones (64 and 256 logits);
and two realistic ones, the 128 largest logits of the default model (weights/default) after two
prompts, renumbered 0..127 in id order. No logit vector has two equal logits where a top-k could
split them.

llama_cpp_samplers.json.gz: the same logit vectors; for each setting of SAMPLER_GRID, llama.cpp's
chain of the samplers that setting turns on ("alone", no temperature) and its default chain
(`common_params_sampling::samplers`, llama.cpp's default values for the settings not changed),
built as above with `llama_sampler_init_typical(p, 0)`, `_top_n_sigma(n)`,
`_xtc(p, t, 0, seed)` and `_dry(vocab, multiplier, base, allowed length, last n, breakers)`
besides. DRY's points carry their own history (`recent`: ids with repeats, breakers, a window
longer than 64); those with sequence breakers use llama.cpp's Llama 3 vocabulary
(`models/ggml-vocab-llama-bpe.gguf` of the llama-cpp-python sdist, fetched with `pip download`)
to turn the breakers into tokens, as llama3_np does with Meta's tokenizer. XTC's points carry
the draw XTC made (`xtc_draw`): llama.cpp draws from `std::mt19937(seed)` through
`std::uniform_real_distribution<float>`, which with libstdc++ is the first 32-bit output rounded
to float32 and divided by 2^32; numpy's MT19937 with the same (legacy) seeding gives it here,
and the point's result shows whether XTC acted (the script checks it agrees).
"""

from __future__ import annotations

import ctypes
import gzip
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata

from tool_support import REPO, run_tool  # first: it makes this checkout's llama3_np importable

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402

from llama3_np.files import make_folder, write_bytes  # noqa: E402
from llama3_np.sampling import DRY_SEQUENCE_BREAKERS, SAMPLER_ORDERS, SamplingParams, survivors  # noqa: E402

OUT = REPO / "tests" / "fixtures" / "sampling" / "chains.json.gz"
OUT_SAMPLERS = REPO / "tests" / "fixtures" / "sampling" / "llama_cpp_samplers.json.gz"
REPEAT_LAST_N = 64  # llama.cpp's penalty_last_n default, and llama3_np's window

# Exact in binary: the whole vocabulary sums to 2.
EXACT_WEIGHTS = [1, 0.5, 0.25, 0.125, 0.0625, 0.046875, 0.015625]
# Exact over the top 4 (they sum to 2); the rest is not.
EXACT_TOP4_WEIGHTS = [1, 0.5, 0.375, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125]

REALISTIC_VOCAB = 128
REALISTIC_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    "]

OFF = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, presence_penalty=0.0,
           frequency_penalty=0.0, typical_p=1.0, top_n_sigma=-1.0, dry_multiplier=0.0, dry_base=1.75,
           dry_allowed_length=2, dry_penalty_last_n=64, dry_sequence_breakers=[], xtc_probability=0.0,
           xtc_threshold=0.1)
LLAMA_CPP_DEFAULTS = {**OFF, **dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)}
GRID = [
    {},
    dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),  # llama.cpp's defaults
    dict(temperature=0.7), dict(temperature=1.5),
    dict(temperature=0.0), dict(temperature=0.0, repeat_penalty=1.5),
    dict(temperature=1e-3), dict(temperature=0.02), dict(temperature=1e-3, top_k=5),
    dict(top_k=1), dict(top_k=2), dict(top_k=4), dict(top_k=10), dict(top_k=1000),  # 1000: more than the vocabulary
    dict(top_p=0.3), dict(top_p=0.5), dict(top_p=0.75), dict(top_p=0.875), dict(top_p=0.9375), dict(top_p=0.95),
    dict(top_k=2, top_p=0.5), dict(top_k=4, top_p=0.75), dict(top_k=4, top_p=0.9375), dict(top_k=40, top_p=0.9),
    dict(min_p=0.05), dict(min_p=0.2), dict(min_p=0.5),
    dict(top_k=4, min_p=0.375), dict(top_k=3, min_p=0.3), dict(top_k=10, min_p=0.1),
    dict(top_k=4, top_p=0.9, min_p=0.2),
    dict(repeat_penalty=1.3), dict(repeat_penalty=0.8), dict(repeat_penalty=1.3, top_k=5, top_p=0.9),
    dict(temperature=1.5, top_k=20, top_p=0.9, min_p=0.05), dict(temperature=0.5, top_p=0.8),
    dict(temperature=2.0, min_p=0.1), dict(temperature=0.6, top_k=10, min_p=0.1, repeat_penalty=1.2),
]


# llama.cpp's other samplers: each setting alone (the samplers it turns on, in llama.cpp's order) and
# in the default chain. Typical p 0.25, 0.75, 0.875 are exact boundaries on the `exact` vector (its
# most typical tokens weigh 1/4, then 1/2, 1/8, 1/16: masses .25, .75, .875, .9375).
SAMPLER_GRID = [
    dict(frequency_penalty=0.5), dict(presence_penalty=0.5), dict(frequency_penalty=1.0, presence_penalty=0.5),
    dict(frequency_penalty=-0.5), dict(presence_penalty=-1.0), dict(frequency_penalty=2.0),
    dict(repeat_penalty=1.3, frequency_penalty=0.3, presence_penalty=0.2),
    dict(typical_p=0.0), dict(typical_p=0.2), dict(typical_p=0.25), dict(typical_p=0.5), dict(typical_p=0.75),
    dict(typical_p=0.875), dict(typical_p=0.9), dict(typical_p=0.95), dict(typical_p=0.99),
    dict(top_n_sigma=0.5), dict(top_n_sigma=1.0), dict(top_n_sigma=1.5), dict(top_n_sigma=2.0),
    dict(top_n_sigma=3.0), dict(top_n_sigma=0.0),
    dict(frequency_penalty=0.5, typical_p=0.9), dict(presence_penalty=0.5, top_n_sigma=1.0),
    # XTC: probability 1 acts at every draw; 0.5 with seeds whose first draw is .417 (acts) and .551 (not).
    dict(xtc_probability=1.0, xtc_threshold=0.05), dict(xtc_probability=1.0, xtc_threshold=0.1),
    dict(xtc_probability=1.0, xtc_threshold=0.2), dict(xtc_probability=1.0, xtc_threshold=0.25),
    dict(xtc_probability=1.0, xtc_threshold=0.3), dict(xtc_probability=1.0, xtc_threshold=0.5),
    dict(xtc_probability=1.0, xtc_threshold=0.6), dict(xtc_probability=0.5, xtc_threshold=0.1, seed=1),
    dict(xtc_probability=0.5, xtc_threshold=0.1, seed=3), dict(xtc_probability=1.0, xtc_threshold=0.1, min_p=0.2),
    # DRY on the histories of DRY_HISTORIES (no breakers, then llama.cpp's)
    dict(dry_multiplier=0.8), dict(dry_multiplier=0.8, dry_allowed_length=1), dict(dry_multiplier=0.8, dry_allowed_length=4),
    dict(dry_multiplier=2.0, dry_base=1.1), dict(dry_multiplier=0.5, dry_base=3.0, dry_allowed_length=0),
    dict(dry_multiplier=0.8, dry_penalty_last_n=16), dict(dry_multiplier=0.8, dry_penalty_last_n=1000),
    dict(dry_multiplier=0.8, dry_base=1.0), dict(dry_multiplier=1e-3, dry_base=100.0, dry_allowed_length=0),
    dict(dry_multiplier=0.8, dry_sequence_breakers=list(DRY_SEQUENCE_BREAKERS)),
    dict(dry_multiplier=0.8, dry_allowed_length=1, dry_sequence_breakers=list(DRY_SEQUENCE_BREAKERS)),
    dict(dry_multiplier=0.8, dry_sequence_breakers=["(", "a b", " the end"]),
    dict(dry_multiplier=0.8, repeat_penalty=1.2, frequency_penalty=0.2, xtc_probability=1.0, xtc_threshold=0.1),
]
# Which sampler each setting belongs to.
SAMPLER_OF = {"repeat_penalty": "penalties", "frequency_penalty": "penalties", "presence_penalty": "penalties",
              "typical_p": "typ_p", "top_n_sigma": "top_n_sigma", "xtc_probability": "xtc", "xtc_threshold": "xtc",
              "seed": "xtc", "min_p": "min_p", "dry_multiplier": "dry", "dry_base": "dry", "dry_allowed_length": "dry",
              "dry_penalty_last_n": "dry", "dry_sequence_breakers": "dry"}
XTC_SEED = 1234  # unless a setting gives one

# DRY's histories: ids below 128 (every logit vector but `exact*` has them); a few are Llama 3's
# breaker tokens (1 '"', 9 '*', 25 ':'), and 64 + a 1000-id window reaches beyond 64 ids.
DRY_HISTORIES = [
    [5, 17, 33, 8, 91, 40, 5, 17, 33, 8],                    # 91 would extend a repeat of 4
    [1, 2, 3, 4, 9, 60, 1, 2, 3, 4, 7, 50, 2, 3, 4],         # 9 and 7 extend repeats of 3
    [7, 7, 7, 7, 7, 7, 7],                                   # overlapping repeats of one id
    [40, 41, 42, 25, 70, 40, 41, 42, 43, 12, 40, 41, 42],    # ':' (25) follows a repeat: a breaker, no penalty
    [30, 31, 32, 33, 34, 9, 30, 31, 32, 33, 1, 30, 31, 32],  # '"' then 3 repeated: breakers limit the repeat
    [20, 21, 22, 23, 24] + list(range(60, 124)) + [20, 21, 22, 23],  # the earlier copy lies 68 ids back
]


def float32_list(x: np.ndarray) -> list[float]:
    # the shortest decimal that reads back as the same float32
    return [float(str(v)) for v in np.asarray(x, dtype=np.float32)]


def exact_case(name: str, weights: list[float], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    logits = np.log(np.array(weights, dtype=np.float64)).astype(np.float32)
    perm = rng.permutation(len(weights))  # the largest logit is not id 0
    return {"name": name, "logits": logits[perm], "recent": [int(perm[0]), int(perm[2]), int(perm[2]), int(perm[5])],
            "source": f"float32 ln of the weights {weights}, permuted (numpy seed {seed})"}


def random_case(name: str, n: int, scale: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(n) * scale).astype(np.float32)
    order = np.argsort(-logits)
    recent = [int(i) for i in order[[0, 1, 1, 3, n // 2, n - 1]]]  # likely and unlikely tokens, one twice
    return {"name": name, "logits": logits, "recent": recent,
            "source": f"numpy default_rng({seed}).standard_normal({n}) * {scale}, float32"}


def realistic_cases() -> list[dict]:
    from llama3_np.assets import default_model
    from llama3_np.formats.checkpoint import load_checkpoint
    from llama3_np.model import forward
    from llama3_np.load import load_tokenizer

    ckpt = load_checkpoint(default_model(), dtype="float32")
    tok = load_tokenizer(default_model())
    cases = []
    for k, text in enumerate(REALISTIC_PROMPTS):
        prompt = tok.encode(text, bos=tok.add_bos)
        logits = forward(ckpt.weights, ckpt.config, prompt)[-1]
        top = np.sort(np.argpartition(-logits, REALISTIC_VOCAB - 1)[:REALISTIC_VOCAB])  # the largest, in id order
        small = logits[top].astype(np.float32)
        position = {int(t): i for i, t in enumerate(top)}
        recent = [position[t] for t in prompt if t in position][-REPEAT_LAST_N:]
        cases.append({"name": f"default_model_{k}", "logits": small, "recent": recent,
                      "source": f"llama3_np forward of weights/default on {text!r}: the {REALISTIC_VOCAB} largest "
                                "of the last position's logits, renumbered in id order; recent: the "
                                "prompt's ids among them"})
    return cases


def settings_of(change: dict) -> dict:
    return {**OFF, **change}


# --- llama.cpp ---------------------------------------------------------------------------------

def llama_cpp_probs(logits: np.ndarray, recent: list[int], s: dict, order: tuple[str, ...], vocab=None) -> np.ndarray:
    import llama_cpp as L

    n = logits.size
    # last n, repeat, frequency, presence
    penalties = (REPEAT_LAST_N, s["repeat_penalty"], s["frequency_penalty"], s["presence_penalty"])
    if len(L.llama_sampler_init_penalties.argtypes) == 5:  # some llama.cpp versions take n_vocab first
        penalties = (n, *penalties)
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    make = {
        "penalties": lambda: L.llama_sampler_init_penalties(*penalties),
        "top_k": lambda: L.llama_sampler_init_top_k(s["top_k"]),
        "top_p": lambda: L.llama_sampler_init_top_p(s["top_p"], 0),
        "min_p": lambda: L.llama_sampler_init_min_p(s["min_p"], 0),
        "temperature": lambda: L.llama_sampler_init_temp_ext(s["temperature"], 0.0, 1.0),
        "typ_p": lambda: L.llama_sampler_init_typical(s["typical_p"], 0),
        "top_n_sigma": lambda: L.llama_sampler_init_top_n_sigma(s["top_n_sigma"]),
        "xtc": lambda: L.llama_sampler_init_xtc(s["xtc_probability"], s["xtc_threshold"], 0, s.get("seed", XTC_SEED)),
        "dry": lambda: dry_sampler(L, s, vocab),
    }
    for name in order:
        L.llama_sampler_chain_add(chain, make[name]())
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(1234))
    for t in recent:  # each sampler keeps its own window
        L.llama_sampler_accept(chain, t)

    data = (L.llama_token_data * n)()
    for i, z in enumerate(logits):
        data[i].id, data[i].logit, data[i].p = i, float(z), 0.0
    arr = L.llama_token_data_array(data=ctypes.cast(data, ctypes.POINTER(L.llama_token_data)),
                                   size=n, selected=-1, sorted=False)
    L.llama_sampler_apply(chain, ctypes.byref(arr))
    probs = np.zeros(n)
    for i in range(arr.size):
        probs[arr.data[i].id] = arr.data[i].p
    L.llama_sampler_free(chain)
    return probs


def dry_sampler(L, s: dict, vocab):
    breakers = [b.encode() for b in s.get("dry_sequence_breakers", [])]
    assert vocab is not None or not breakers, "breakers need the vocabulary"
    array = (ctypes.c_char_p * max(len(breakers), 1))(*breakers)
    return L.llama_sampler_init_dry(vocab, s["dry_multiplier"], s["dry_base"], s["dry_allowed_length"],
                                    s["dry_penalty_last_n"], array, len(breakers))


def llama3_vocab(tmp: str):
    """llama.cpp's Llama 3 vocabulary (vocab only) from the sdist of the installed llama-cpp-python."""
    import llama_cpp as L

    version = metadata.version("llama_cpp_python")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={version}", "-d", tmp], check=True)
    with tarfile.open(os.path.join(tmp, f"llama_cpp_python-{version}.tar.gz")) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf"))
        path = os.path.join(tmp, "ggml-vocab-llama-bpe.gguf")
        with open(path, "wb") as f:
            f.write(tar.extractfile(member).read())
    params = L.llama_model_default_params()
    params.vocab_only = True
    model = L.llama_model_load_from_file(path.encode(), params)
    assert model, path
    return L.llama_model_get_vocab(model)


def first_xtc_draw(seed: int) -> float:
    # std::uniform_real_distribution<float>(0, 1) of std::mt19937(seed), libstdc++: one 32-bit
    # output, rounded to float32, divided by 2^32
    bits = np.random.MT19937()
    bits._legacy_seeding(seed)
    return float(np.float32(bits.random_raw())) / 2**32


# --- transformers ------------------------------------------------------------------------------

def transformers_probs(logits: np.ndarray, recent: list[int], s: dict) -> np.ndarray:
    import torch
    from transformers.generation import logits_process as P

    ids = torch.tensor([recent[-REPEAT_LAST_N:]], dtype=torch.long)
    scores = torch.from_numpy(logits.copy())[None, :]
    processors = []
    if s["repeat_penalty"] != 1.0:
        processors.append(P.RepetitionPenaltyLogitsProcessor(float(s["repeat_penalty"])))
    if s["temperature"] == 0:  # do_sample=False: greedy on the processed logits
        for proc in processors:
            scores = proc(ids, scores)
        probs = np.zeros(logits.size)
        probs[int(torch.argmax(scores[0]))] = 1.0
        return probs
    if s["temperature"] != 1.0:
        processors.append(P.TemperatureLogitsWarper(float(s["temperature"])))
    if s["top_k"] != 0:
        processors.append(P.TopKLogitsWarper(top_k=int(s["top_k"]), min_tokens_to_keep=1))
    if s["top_p"] < 1.0:
        processors.append(P.TopPLogitsWarper(top_p=float(s["top_p"]), min_tokens_to_keep=1))
    if s["min_p"] is not None:
        processors.append(P.MinPLogitsWarper(min_p=float(s["min_p"]), min_tokens_to_keep=1))
    for proc in processors:
        scores = proc(ids, scores)
    if s["top_k"] != 0:
        kept = int(torch.isfinite(scores).sum())
        assert kept <= s["top_k"], f"a tie at the top-k boundary keeps {kept} > {s['top_k']}: choose other logits"
    return torch.softmax(scores[0].double(), dim=-1).numpy()


def check_exact(case: dict, weights: list[float]) -> None:
    """The exact cases are exact in float32: torch's exp and a correctly rounded exp both give the weights."""
    import torch
    z = case["logits"]
    ours = np.exp(z.astype(np.float64) - float(z.max())).astype(np.float32)
    theirs = torch.exp(torch.from_numpy(z - z.max())).numpy()
    want = np.sort(np.array(weights, dtype=np.float32))
    assert np.array_equal(np.sort(ours), want) and np.array_equal(np.sort(theirs), want), (ours, theirs)


def check_top_n_sigma_margin(case: dict, s: dict, order: tuple[str, ...]) -> None:
    """No logit lies so near top-n-sigma's threshold that float32 rounding of its mean and sigma
    (llama.cpp sums in float32) could move it to the other side."""
    if "top_n_sigma" not in order or s["top_n_sigma"] <= 0:
        return
    before = order[:order.index("top_n_sigma")]
    _, z = survivors(case["logits"], SamplingParams(**s, samplers=before), case["recent"])
    z = z.astype(np.float64)
    threshold = z.max() - s["top_n_sigma"] * z.std()
    assert np.abs(z - threshold).min() > 1e-5 * max(1.0, abs(threshold)), (case["name"], s)


def sampler_results(cases: list[dict], vocab) -> dict:
    settings, results = [], []
    for change in SAMPLER_GRID:
        alone = tuple(name for name in SAMPLER_ORDERS["llama.cpp"] if name in {SAMPLER_OF[k] for k in change})
        for chain, base, order in (("alone", OFF, alone), ("llama.cpp", LLAMA_CPP_DEFAULTS, SAMPLER_ORDERS["llama.cpp"])):
            s = {**base, **change}
            settings.append({k: v for k, v in s.items() if k != "seed"})
            for ci, case in enumerate(cases):
                histories = DRY_HISTORIES if "dry" in alone else [case["recent"]]
                if "dry" in alone and case["logits"].size < 128:
                    continue
                for recent in histories:
                    check_top_n_sigma_margin(case, s, order)
                    probs = llama_cpp_probs(case["logits"], recent, s, order, vocab)
                    kept = np.flatnonzero(probs)
                    r = {"case": ci, "setting": len(settings) - 1, "chain": chain, "samplers": list(order),
                         "ids": [int(i) for i in kept], "probs": [float(f"{p:.8g}") for p in probs[kept]]}
                    if "dry" in alone:
                        r["recent"] = recent
                    if "xtc" in alone:
                        r["xtc_draw"] = first_xtc_draw(s.get("seed", XTC_SEED))
                        check_xtc_draw(case, s, order, recent, r["xtc_draw"], probs, vocab)
                    results.append(r)
    return {"settings": settings, "results": results}


def check_xtc_draw(case: dict, s: dict, order: tuple[str, ...], recent: list[int], draw: float,
                   probs: np.ndarray, vocab) -> None:
    """XTC changed the result only where the draw says it acts (draw <= probability)."""
    without = llama_cpp_probs(case["logits"], recent, {**s, "xtc_probability": 0.0}, order, vocab)
    changed = not np.array_equal(np.flatnonzero(probs), np.flatnonzero(without))
    assert draw <= s["xtc_probability"] or not changed, (case["name"], s, draw)


def write_gzip_json(path, doc: dict) -> None:
    # no time stamp, so that the bytes depend on the content only
    write_bytes(make_folder(path.parent) / path.name,
                gzip.compress((json.dumps(doc, separators=(",", ":")) + "\n").encode(), mtime=0))


def main() -> int:
    cases = [exact_case("exact", EXACT_WEIGHTS, 1), exact_case("exact_top4", EXACT_TOP4_WEIGHTS, 2)]
    check_exact(cases[0], EXACT_WEIGHTS)
    check_exact(cases[1], EXACT_TOP4_WEIGHTS)
    cases += [random_case("random_64", 64, 2.0, 3), random_case("random_256", 256, 3.0, 4)]
    cases += realistic_cases()
    for c in cases:
        assert np.unique(c["logits"]).size == c["logits"].size, f"{c['name']}: equal logits"

    results = []
    for ci, case in enumerate(cases):
        for si, change in enumerate(GRID):
            s = settings_of(change)
            references = {"llama.cpp": llama_cpp_probs(case["logits"], case["recent"], s, SAMPLER_ORDERS["llama.cpp"]),
                          "transformers": transformers_probs(case["logits"], case["recent"], s)}
            for order, probs in references.items():
                kept = np.flatnonzero(probs)
                results.append({"case": ci, "setting": si, "order": order, "ids": [int(i) for i in kept],
                                "probs": [float(f"{p:.8g}") for p in probs[kept]]})

    doc = {
        "producer": {"script": "tools/make_sampler_fixtures.py",
                     "llama-cpp-python": metadata.version("llama_cpp_python"),
                     "transformers": metadata.version("transformers"), "torch": metadata.version("torch")},
        "orders": {name: list(order) for name, order in SAMPLER_ORDERS.items()},
        "repeat_last_n": REPEAT_LAST_N,
        "cases": [{**c, "logits": float32_list(c["logits"])} for c in cases],
        "settings": [settings_of(change) for change in GRID],
        "results": results,
    }
    write_gzip_json(OUT, doc)  # 200 KB of JSON, 40 KB compressed
    tmp = tempfile.mkdtemp(prefix="make_sampler_fixtures.")
    vocab = llama3_vocab(tmp)
    print(f"wrote {OUT.relative_to(REPO)} ({OUT.stat().st_size // 1024} KB): {len(cases)} logit vectors x "
          f"{len(GRID)} settings x 2 orders", file=sys.stderr)

    doc = {"producer": {"script": "tools/make_sampler_fixtures.py",
                        "llama-cpp-python": metadata.version("llama_cpp_python")},
           "repeat_last_n": REPEAT_LAST_N,
           "cases": [{**c, "logits": float32_list(c["logits"])} for c in cases],
           **sampler_results(cases, vocab)}
    write_gzip_json(OUT_SAMPLERS, doc)
    print(f"wrote {OUT_SAMPLERS.relative_to(REPO)} ({OUT_SAMPLERS.stat().st_size // 1024} KB): {len(cases)} logit "
          f"vectors x {len(SAMPLER_GRID)} settings x 2 chains", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("make_sampler_fixtures", main))
