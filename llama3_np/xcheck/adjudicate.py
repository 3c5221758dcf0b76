"""A ruling on two engines' greedy continuations of one prompt: where they part, a near-tie inside
the rounding noise of the precisions the engines declare, or a defect.

Two correct engines that round differently can choose different tokens where the model's two best
candidates are almost equally likely; anywhere else a different choice is a bug. `adjudicate`:

1. finds the first position where the continuations part (candidates `a` and `b` there);
2. replays the common prefix (prompt + the continuations' shared tokens) teacher-forced through
   llama3_np in float64, the exact value, and in each engine's declared compute mode
   (`config.ComputeMode`: float32, bfloat16, float16 emulate where such an engine rounds);
3. takes the float64 logit margin m = z64[a] - z64[b];
4. measures the noise of a margin in each declared mode at that position: over the TOP_N
   candidates most probable in float64, d = z_mode - z64 is the mode's logit error, and the error
   of a margin between two of them has the spread sigma = sqrt(2) * std(d);
5. rules: near-tie when |m| <= band = NOISE_K * (sigma_a + sigma_b) (either engine may have
   flipped the order), else defect, by |m| / band.

NOISE_K is measured: docs/DESIGN.md, "Rulings on a divergence" (tools/calibrate_adjudicate.py,
tests/fixtures/adjudicate/).

With an engine's dump of the common prefix (`llama3-np dump`, tools/torch_dump.py, any producer
of the dump format), the ruling also says where that engine's error enters: `compare --replay` in
the mode the dump declares (`replay.replay`), its stage with the largest local error and the
earliest stage, in the order of the data path, whose local error is past compare's tolerance. The
verdict stays the margin's: the replay tolerance is calibrated for float32 engines, and a rounding
fault (a missing cast) can move no margin beyond the band while replay names its stage.

The continuations are token ids. `read_continuation` reads those the common engines write (see
CONTINUATION_FORMATS); text without ids is refused: retokenizing a text need not give the ids the
engine chose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

from ..checks import token_ids
from ..config import ModelConfig
from ..errors import Llama3Error
from ..model import forward
from ..stages import stage_order
from ..text.pieces import quoted
from .compare import DEFAULT_NMSE_TOL
from .dump import Dump
from .replay import ReplayedStage, declared_mode, replay

TOP_N = 8  # the candidates whose logit errors measure a margin's noise
NOISE_K = 13  # calibrated: tests/fixtures/adjudicate/ (tools/calibrate_adjudicate.py), docs/DESIGN.md

# What `read_continuation` reads, in the order it tries them (each a JSON value).
CONTINUATION_FORMATS = {
    "ids": "a JSON list of token ids (the continuation alone)",
    "llama3-np": "`llama3-np generate --json`: {\"prompt_ids\": [...], \"ids\": [...], ...}",
    "transformers": "transformers' `generate` output as lists: {\"sequences\": [[prompt + new ids]]} "
                    "(`output.sequences.tolist()` in a dict) or [[prompt + new ids]] (`output.tolist()`)",
    "vllm": "vLLM's OpenAI completions response with \"return_token_ids\": true: "
            "{\"choices\": [{\"token_ids\": [...], \"prompt_token_ids\": [...]}]}",
    "llama.cpp": "llama.cpp server's /completion response with \"return_tokens\": true ({\"tokens\": [...]}) "
                 "or with \"n_probs\" ({\"completion_probabilities\": [{\"id\": ...}, ...]})",
}


def _is_ids(x) -> bool:
    return isinstance(x, list) and all(type(t) is int for t in x)


def holds_prompt_and_continuation(value) -> bool:
    """True for transformers' `generate` output (one sequence: prompt ids, then the new ones)."""
    sequences = value.get("sequences") if isinstance(value, dict) else value
    return isinstance(sequences, list) and len(sequences) == 1 and _is_ids(sequences[0])


def read_continuation(value, prompt: Optional[Sequence[int]] = None) -> tuple[Optional[list[int]], list[int], str]:
    """(the prompt ids it carries or None, the continuation's ids, the format's name) of a JSON
    value an engine wrote (CONTINUATION_FORMATS). A transformers sequence holds prompt and
    continuation: `prompt` (ids) says where the continuation starts.

    Raises Llama3Error for a value of none of the formats, or a sequence that does not start with
    the prompt."""
    if _is_ids(value):
        return None, list(value), "ids"
    if isinstance(value, dict) and _is_ids(value.get("ids")) and _is_ids(value.get("prompt_ids")):
        return list(value["prompt_ids"]), list(value["ids"]), "llama3-np"
    if holds_prompt_and_continuation(value):
        seq = (value["sequences"] if isinstance(value, dict) else value)[0]
        if prompt is None:
            raise Llama3Error("a transformers sequence holds prompt and continuation together: give the prompt "
                              "(its ids, or text) to tell them apart")
        if seq[:len(prompt)] != list(prompt):
            raise Llama3Error("the transformers sequence does not start with the prompt's ids: give the prompt "
                              "it was generated from")
        return list(prompt), seq[len(prompt):], "transformers"
    if isinstance(value, dict) and isinstance(value.get("choices"), list) and value["choices"]:
        choice = value["choices"][0]
        if isinstance(choice, dict) and _is_ids(choice.get("token_ids")):
            p = choice.get("prompt_token_ids", value.get("prompt_token_ids"))
            return (list(p) if _is_ids(p) else None), list(choice["token_ids"]), "vllm"
    if isinstance(value, dict) and _is_ids(value.get("tokens")):
        return None, list(value["tokens"]), "llama.cpp"
    if isinstance(value, dict) and isinstance(value.get("completion_probabilities"), list):
        probs = value["completion_probabilities"]
        if probs and all(isinstance(p, dict) and type(p.get("id")) is int for p in probs):
            return None, [p["id"] for p in probs], "llama.cpp"
    has_text = isinstance(value, dict) and any(k in value for k in ("text", "content", "choices"))
    raise Llama3Error("the continuation is " + ("text without token ids: ask the engine for its ids "
                                                "(vLLM: return_token_ids, llama.cpp: return_tokens)" if has_text
                                                else "JSON of an unknown shape") +
                      "; give " + "; or ".join(CONTINUATION_FORMATS.values()))


def prompt_and_continuations(values: Sequence, prompt: Optional[Sequence[int]] = None
                             ) -> tuple[list[int], list[int], list[int]]:
    """(prompt, a, b): the ids of two engines' outputs `values` (each a JSON value of
    CONTINUATION_FORMATS) and of the prompt they continue, given as `prompt` or carried by either.
    A transformers sequence (prompt and continuation together) is split by the prompt's ids.

    Raises Llama3Error when neither gives the prompt, the two carry different prompts or the one
    given differs from one carried, and as `read_continuation`."""
    given = None if prompt is None else [int(t) for t in prompt]
    ids = {}
    # Those that carry their prompt first: a transformers sequence is split by the prompt's ids.
    for value, side in sorted(zip(values, "AB"), key=lambda vs: holds_prompt_and_continuation(vs[0])):
        carried, ids[side], _ = read_continuation(value, given)
        if carried is not None and given is not None and carried != given:
            raise Llama3Error(f"{side} continues other prompt ids than the prompt given or the other "
                              "continuation's: give continuations of the same prompt")
        given = carried if carried is not None else given
    if given is None:
        raise Llama3Error("give the prompt the continuations follow: neither continuation carries it")
    return given, ids["A"], ids["B"]


def first_divergence(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    """The first index where a and b hold different ids; None when one is a prefix of the other."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def margin_noise(z64: np.ndarray, z: np.ndarray, top_n: int = TOP_N) -> float:  # [V], [V] -> sigma
    """The spread of a logit margin's error in a compute mode at one position: over the top_n
    candidates most probable in float64, sqrt(2) * std(z - z64) (module docstring, step 4)."""
    top = np.argsort(-z64, kind="stable")[:top_n]
    d = np.asarray(z, np.float64)[top] - np.asarray(z64, np.float64)[top]
    return math.sqrt(2) * float(np.std(d))


@dataclass
class Entry:
    """Where one engine's error enters, by a replay of its dump of the common prefix."""
    compute: str  # the mode the dump declares, replayed in
    largest: ReplayedStage  # the stage with the largest local error
    first_past: Optional[ReplayedStage]  # the earliest stage (data path order) past the tolerance
    past: int  # how many stages are past it
    stages: int  # how many stages the dump holds
    tol: float

    def to_json(self) -> dict:
        return {"compute": self.compute, "largest_local": self.largest.name, "largest_local_nmse": self.largest.local.nmse,
                "first_past_tolerance": self.first_past.name if self.first_past else None,
                "past_tolerance": self.past, "stages": self.stages, "nmse_tol": self.tol}


def error_entry(weights: Mapping[str, np.ndarray], config: ModelConfig, dump: Dump, prefix: Sequence[int],
                nmse_tol: float = DEFAULT_NMSE_TOL) -> Entry:
    """Where the engine that wrote `dump` adds its error, by `replay.replay` (module docstring):
    the dump must hold the forward pass of `prefix` (the prompt and the shared tokens: the pass
    whose last position chose the parting token) from position 0, no cache before it.

    Raises Llama3Error for a dump of other tokens, and as `replay.replay`."""
    inputs = dump.inputs()
    if inputs.tokens != list(prefix) or inputs.pos != 0 or inputs.context:
        raise Llama3Error(f"{dump.path} holds a pass over other tokens than the common prefix of the continuations: "
                          f"dump the {len(prefix)} tokens " + ",".join(map(str, prefix)) + " from position 0")
    stages = replay(weights, config, dump, nmse_tol)
    past = sorted((r for r in stages if r.local.diverged), key=lambda r: stage_order(r.name))
    return Entry(declared_mode(dump).name, stages[0], past[0] if past else None, len(past), len(stages), nmse_tol)


@dataclass
class Ruling:
    verdict: str  # "agree", "near-tie" or "defect"
    position: Optional[int] = None  # index into the continuations where they part
    a: Optional[int] = None  # the two candidates there
    b: Optional[int] = None
    margin: float = 0.0  # float64 logit of a minus that of b
    band: float = 0.0  # NOISE_K * (sigma of a's mode + sigma of b's mode)
    sigma: dict = field(default_factory=dict)  # compute mode -> its margin noise at the position
    margins: dict = field(default_factory=dict)  # compute mode -> its own margin z[a] - z[b]
    top: list = field(default_factory=list)  # [(id, float64 logit)], the TOP_N most probable
    common: int = 0  # tokens the continuations share before they part
    compute_a: str = "float32"  # the modes the engines declared
    compute_b: str = "float32"
    entries: dict = field(default_factory=dict)  # "A"/"B" -> Entry, for an engine whose dump was given

    @property
    def excess(self) -> float:
        """|margin| / band: above 1, how far outside the noise."""
        return abs(self.margin) / self.band if self.band > 0 else math.inf

    def to_json(self) -> dict:
        out = {"verdict": self.verdict, "position": self.position, "common_tokens": self.common,
               "compute_a": self.compute_a, "compute_b": self.compute_b}
        if self.position is not None:
            out.update(a=self.a, b=self.b, margin_float64=self.margin, band=self.band,
                       excess=self.excess if math.isfinite(self.excess) else None, noise_k=NOISE_K,
                       sigma=self.sigma, margins=self.margins, top=[[i, z] for i, z in self.top])
        out.update({f"entry_{side.lower()}": e.to_json() for side, e in self.entries.items()})
        return out


def ruling_report(r: Ruling, names: Mapping[int, str]) -> str:
    """The report `llama3-np adjudicate` prints: where the continuations part, the float64 logits
    of the most probable candidates there, the margin, the band and the verdict. `names` gives the
    text of each id shown (`r.top`, `r.a`, `r.b`)."""
    if r.verdict == "agree":
        return f"verdict: agree (the continuations share their first {_tokens(r.common)} and do not part)"
    label_a, label_b = f"A ({r.compute_a})", f"B ({r.compute_b})"
    width = max(len(label_a), len(label_b))
    lines = [f"the continuations agree on {_tokens(r.common)}, then part at position {r.common}:",
             f"  {label_a:<{width}} chose {r.a:>6} {quoted(names[r.a])}",
             f"  {label_b:<{width}} chose {r.b:>6} {quoted(names[r.b])}",
             "float64 logits, most probable first: " + ", ".join(f"{quoted(names[i])} {v:.4f}" for i, v in r.top),
             f"float64 margin A - B: {r.margin:+.6f}"]
    if r.compute_a == r.compute_b:
        sigmas = f"2 x sigma {r.compute_a} {r.sigma[r.compute_a]:.3g}"
    else:
        sigmas = " + ".join(f"sigma {m} {r.sigma[m]:.3g}" for m in (r.compute_a, r.compute_b))
    lines.append(f"noise band: {NOISE_K:g} x ({sigmas}) = {r.band:.6f}")
    if r.verdict == "near-tie":
        lines.append(f"verdict: near-tie (|margin| is {r.excess:.2f} of the band)")
    else:
        lines.append(f"verdict: defect (|margin| is {r.excess:.1f} times the band)")
    for side, e in r.entries.items():
        first = (f"first past NMSE {e.tol:.0e} in the data path: {e.first_past.name}" if e.first_past
                 else f"none past NMSE {e.tol:.0e}")
        lines.append(f"{side}'s dump replayed in {e.compute}: {e.largest.name} adds the largest error "
                     f"(local NMSE {e.largest.local.nmse:.3g}); {first} ({e.past} of {e.stages} stages past it)")
    return "\n".join(lines)


def _tokens(n: int) -> str:
    return f"{n} token" + ("" if n == 1 else "s")


def adjudicate(weights: Mapping[str, np.ndarray], config: ModelConfig, prompt: Sequence[int],
               a: Sequence[int], b: Sequence[int], compute_a: str = "float32",
               compute_b: str = "float32", dumps: Optional[Mapping[str, Dump]] = None) -> Ruling:
    """Rule on continuations `a` and `b` of `prompt` (token ids) by engines that declare the compute
    modes `compute_a` and `compute_b` (module docstring); `dumps` ("A", "B" -> the engine's dump of
    the common prefix) add where that engine's error enters (`error_entry`).

    Raises Llama3Error for empty inputs, ids outside the vocabulary, an unknown compute mode, a
    prefix longer than the model's context, dumps when the continuations agree, and as
    `error_entry`."""
    prompt, a, b = [int(t) for t in prompt], [int(t) for t in a], [int(t) for t in b]
    if not prompt:
        raise Llama3Error("the prompt is empty: give the prompt the continuations follow")
    if not a or not b:
        raise Llama3Error(f"continuation {'a' if not a else 'b'} is empty: give the ids each engine generated")
    token_ids(prompt + a + b, config.vocab_size)
    k = first_divergence(a, b)
    if k is None:
        if dumps:
            raise Llama3Error("the continuations do not part: there is no common prefix for a dump to explain")
        return Ruling("agree", common=min(len(a), len(b)), compute_a=compute_a, compute_b=compute_b)
    prefix = prompt + a[:k]
    if len(prefix) > config.max_seq_len:
        raise Llama3Error(f"the common prefix has {len(prefix)} tokens, more than the model's {config.max_seq_len}")
    logits = {mode: forward(weights, config, prefix, compute=mode, last_only=True)[0].astype(np.float64)
              for mode in dict.fromkeys(("float64", compute_a, compute_b))}
    z64 = logits["float64"]
    sigma = {mode: margin_noise(z64, z) for mode, z in logits.items() if mode != "float64"}
    band = NOISE_K * (sigma.get(compute_a, 0.0) + sigma.get(compute_b, 0.0))
    margin = float(z64[a[k]] - z64[b[k]])
    top = np.argsort(-z64, kind="stable")[:TOP_N]
    entries = {side: error_entry(weights, config, dump, prefix) for side, dump in sorted((dumps or {}).items())}
    return Ruling("near-tie" if abs(margin) <= band else "defect", k, a[k], b[k], margin, band, sigma,
                  {mode: float(z[a[k]] - z[b[k]]) for mode, z in logits.items()},
                  [(int(i), float(z64[i])) for i in top], k, compute_a, compute_b, entries)
