"""Choosing the next token from the logits of the last position: a chain of samplers.

`sampling_probs` builds the distribution the sampler draws from; `sample` draws from it. The
samplers form a chain, as in llama.cpp (`llama_sampler_chain`, `src/llama-sampler.cpp`): each one
acts on the tokens that survived the one before, and every probability it looks at is the softmax
of those survivors only (renormalised), never of the whole vocabulary. Names are llama.cpp's:

    penalties    CTRL repetition penalty on the logits of recently seen tokens: positive ones
                 divided by r, the others multiplied by r (Keskar et al. 2019, arXiv 1909.05858,
                 with llama.cpp's and Hugging Face's fix for negative logits)
    top_k        keep the k largest logits (k = 0 or k >= the survivors: keep all); on equal
                 logits the lower id is kept
    top_p        keep the smallest set of most probable survivors whose mass reaches p: token i
                 (most probable first) is kept when the mass before it is < p, so at an exact
                 boundary the token that completes p is the last one kept (Holtzman et al. 2020,
                 arXiv 1904.09751; llama.cpp `cum_sum >= p`); p = 1: keep all; at least one is kept
    min_p        keep survivors whose probability is >= p times the largest survivor's
                 (Nguyen et al. 2024, arXiv 2407.01082); the largest is always kept
    temperature  divide the survivors' logits by T; T = 0 keeps only the largest (greedy; the
                 lower id on equal logits)

After the chain, the survivors' softmax is the distribution; a seeded numpy Generator draws from it.
Filters never add tokens back, and only `penalties` and `temperature` change logits.

Two orders, with the same samplers:

    llama.cpp (the default)  penalties, top_k, top_p, min_p, temperature
        llama.cpp's default `--samplers` (`common/common.h` `common_params_sampling::samplers`,
        built into a chain by `common/sampling.cpp` `common_sampler_init`) without the samplers
        llama3_np does not have (dry, top_n_sigma, typ_p, xtc, all off by default). Temperature
        comes last, so it only reshapes the survivors: it does not change which tokens top-p and
        min-p keep.
    transformers             penalties, temperature, top_k, top_p, min_p
        Hugging Face `generate` (`GenerationMixin._get_logits_processor`: the
        RepetitionPenaltyLogitsProcessor, then TemperatureLogitsWarper, TopKLogitsWarper,
        TopPLogitsWarper, MinPLogitsWarper). Temperature comes first: a hotter distribution makes
        top-p and min-p keep more tokens. (Hugging Face's top-k keeps every token tied with the
        k-th; here exactly k are kept.)

Any order of any subset can be given by name (`parse_samplers("top_k;top_p;temperature")`,
llama.cpp's `--samplers` syntax); a sampler left out is not applied, as in llama.cpp.

Arithmetic follows the references where a boundary depends on it: logits stay float32 (the
penalty and temperature divide in float32, like llama.cpp and torch), and the unnormalised
probabilities exp(z - max) that top-p and min-p compare are rounded to float32 once (from float64,
whose last-bit differences between CPUs lie far below float32's resolution), as the references'
float32 softmax rounds them. A boundary
that is exact in their arithmetic (weights 1, 1/2, 1/4 from the float32 logits 0, ln 1/2, ln 1/4)
is then exact here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .errors import Llama3Error, ParameterError

SAMPLER_NAMES = ("penalties", "top_k", "top_p", "min_p", "temperature")

# Order presets, by name (see the module docstring for their sources).
SAMPLER_ORDERS = {
    "llama.cpp": ("penalties", "top_k", "top_p", "min_p", "temperature"),
    "transformers": ("penalties", "temperature", "top_k", "top_p", "min_p"),
}
DEFAULT_SAMPLERS = SAMPLER_ORDERS["llama.cpp"]

# llama.cpp's other spellings (`common_sampler_types_from_names`, alternative names)...
_ALT_NAMES = {"top-k": "top_k", "top-p": "top_p", "nucleus": "top_p", "min-p": "min_p", "temp": "temperature"}
# ...and the samplers llama.cpp has that llama3_np does not.
_NOT_IMPLEMENTED = {"dry", "top_n_sigma", "top-n-sigma", "typ_p", "typ-p", "typical", "typical-p", "typ",
                    "xtc", "infill", "adaptive_p", "adaptive-p"}

# Above this many survivors, top-p first looks for its cut among the largest few (llama.cpp's
# adaptive sort does the same): a full sort of a 128k vocabulary costs more than the forward pass
# of a small model.
_TOP_P_FIRST_LOOK = 256


def parse_samplers(text: str) -> tuple[str, ...]:
    """A sampler order from llama.cpp's `--samplers` syntax: names separated by ';' (for example
    "top_k;top_p;min_p;temperature"), or an order preset's name ("llama.cpp", "transformers").
    An empty string is the empty chain (softmax of the raw logits).

    Raises ParameterError (parameter "samplers") for an unknown name, a sampler llama3_np does
    not have, an empty name or a name given twice."""
    if text in SAMPLER_ORDERS:
        return SAMPLER_ORDERS[text]
    if text.strip() == "":
        return ()
    choices = f"choose from {', '.join(SAMPLER_NAMES)}, or the order {' or '.join(SAMPLER_ORDERS)}"
    names: list[str] = []
    for raw in text.split(";"):
        name = _ALT_NAMES.get(raw.strip(), raw.strip())
        if name == "":
            raise ParameterError("samplers", f"empty sampler name in {text!r}: separate names by a single ';'")
        if name in _NOT_IMPLEMENTED:
            raise ParameterError("samplers", f"sampler {raw.strip()!r} is llama.cpp's but not implemented "
                                                 f"in llama3_np ({choices})")
        if name not in SAMPLER_NAMES:
            raise ParameterError("samplers", f"unknown sampler {raw.strip()!r} ({choices})")
        if name in names:
            raise ParameterError("samplers", f"sampler {name!r} is given twice in {text!r}: each may appear once")
        names.append(name)
    return tuple(names)


@dataclass(frozen=True)
class SamplingParams:
    """Defaults follow llama.cpp's command line (`common_params_sampling`): temperature 0.8,
    top-k 40, top-p 0.95, min-p 0.05, no repetition penalty, llama.cpp's order.

    Raises ParameterError naming the parameter that is out of range."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    samplers: tuple[str, ...] = DEFAULT_SAMPLERS

    def __post_init__(self):
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ParameterError("temperature", f"temperature must be >= 0 (0 = greedy), "
                                                    f"got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ParameterError("top_k", f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise ParameterError("top_p", f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not (0 <= self.min_p < 1):
            raise ParameterError("min_p", f"min_p must be in [0, 1) (0 = off), got {self.min_p}")
        if not (self.repeat_penalty > 0 and np.isfinite(self.repeat_penalty)):
            raise ParameterError("repeat_penalty", f"repeat_penalty must be > 0 (1 = off), "
                                                       f"got {self.repeat_penalty}")
        unknown = [s for s in self.samplers if s not in SAMPLER_NAMES]
        if unknown or len(set(self.samplers)) != len(self.samplers):
            raise ParameterError("samplers", f"samplers must be distinct names from {', '.join(SAMPLER_NAMES)}, "
                                                 f"got {';'.join(self.samplers)!r}")

    @property
    def greedy(self) -> bool:
        """True when the chain keeps a single token (temperature 0 in the chain)."""
        return self.temperature == 0 and "temperature" in self.samplers


def _penalties(ids, z, recent, penalty):
    if penalty == 1:
        return z
    seen = np.unique(np.fromiter(recent, dtype=np.int64))  # each seen token once, however often
    pos = np.searchsorted(ids, seen)  # ids are ascending
    inside = pos < ids.size
    pos, seen = pos[inside], seen[inside]
    pos = pos[ids[pos] == seen]  # seen tokens that are still candidates
    # In float32, as llama.cpp (`llama_sampler_penalties_apply`) and torch compute it.
    r = np.float32(penalty)
    z = z.copy()
    z[pos] = np.where(z[pos] > 0, z[pos] / r, z[pos] * r)
    return z


def _weights32(z: np.ndarray) -> np.ndarray:
    # [n] float32 logits -> [n] float64 holding float32 values: exp(z - max z), rounded to float32
    # once (see the module docstring).
    top = z.max()
    return np.exp(z.astype(np.float64) - np.float64(top)).astype(np.float32).astype(np.float64)


def _most_probable_first(z: np.ndarray, ids: np.ndarray) -> np.ndarray:
    # positions into z, largest logit first, lower id first on equal logits
    return np.lexsort((ids, -z))


def _top_k(ids, z, k):
    if k == 0 or k >= z.size:
        return ids, z
    kth = z[np.argpartition(-z, k - 1)[k - 1]]  # the k-th largest logit, without a full sort
    keep = z > kth
    ties = np.flatnonzero(z == kth)[: k - int(keep.sum())]  # lower ids first: ids are ascending
    keep[ties] = True
    return ids[keep], z[keep]


def _top_p(ids, z, p):
    if p >= 1 or z.size == 1:
        return ids, z
    w = _weights32(z)
    total = w.sum()
    if z.size > _TOP_P_FIRST_LOOK:
        first = np.argpartition(-z, _TOP_P_FIRST_LOOK - 1)[:_TOP_P_FIRST_LOOK]
        first = first[_most_probable_first(z[first], ids[first])]
        n = _top_p_count(np.cumsum(w[first]) / total, p)
        # The cut is inside the first look, and no token left out has the logit of the last one kept.
        if n < first.size and z[first[n - 1]] > z[first[-1]]:
            keep = np.sort(first[:n])
            return ids[keep], z[keep]
    order = _most_probable_first(z, ids)
    keep = np.sort(order[:_top_p_count(np.cumsum(w[order]) / total, p)])
    return ids[keep], z[keep]


def _top_p_count(mass: np.ndarray, p: float) -> int:
    # mass: the cumulative probability, most probable first. Token i is kept while the mass before
    # it is < p: the count is 1 + the first i whose mass reaches p.
    return min(int(np.searchsorted(mass, p, side="left")) + 1, mass.size)


def _min_p(ids, z, p):
    if p <= 0:
        return ids, z
    keep = _weights32(z) >= p  # p_i / p_max = exp(z_i - z_max)
    return ids[keep], z[keep]


def _temperature(ids, z, t):
    if np.float32(t) == 0:  # below float32's smallest positive number: its limit, greedy
        i = int(np.argmax(z))  # the first maximum: the lower id
        return ids[i:i + 1], z[i:i + 1]
    with np.errstate(over="ignore"):
        scaled = z / np.float32(t)
    if not np.isfinite(scaled.max()):
        # t so small that the largest logit overflowed to +-inf: its limit, the largest logits
        # share the mass equally (the rest become 0 after the softmax)
        top = z == z.max()
        return ids[top], np.zeros(int(top.sum()), dtype=np.float32)
    return ids, scaled


def survivors(logits: np.ndarray, params: SamplingParams,
              recent: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    # [V] -> ([n] ids ascending, [n] float32 logits)
    """Run the chain `params.samplers`: the ids that survive and their final logits (after
    penalty and temperature). Their softmax is the distribution `sample` draws from."""
    z = np.array(logits, dtype=np.float32).reshape(-1)
    ids = np.arange(z.size)
    # Every filter keeps its input's most probable token, and temperature 0 keeps only that one:
    # with temperature 0, filters before it cannot change the outcome, and after it nothing is left
    # to filter.
    skip_filters = params.greedy
    for name in params.samplers:
        if name == "penalties":
            z = _penalties(ids, z, recent, params.repeat_penalty)
        elif name == "temperature":
            ids, z = _temperature(ids, z, params.temperature)
            skip_filters = False
        elif skip_filters:
            continue
        elif name == "top_k":
            ids, z = _top_k(ids, z, int(params.top_k))
        elif name == "top_p":
            ids, z = _top_p(ids, z, params.top_p)
        elif name == "min_p":
            ids, z = _min_p(ids, z, params.min_p)
    return ids, z


def _softmax64(z: np.ndarray) -> np.ndarray:
    w = _weights32(z) if np.isposinf(z.max()) else np.exp(z.astype(np.float64) - np.float64(z.max()))
    return w / w.sum()


def sampling_probs(logits: np.ndarray, params: SamplingParams, recent: Iterable[int] = ()) -> np.ndarray:
    # [V] -> [V]
    """The distribution `sample` draws from: float64, zeros for filtered-out tokens, sums to 1."""
    ids, z = survivors(logits, params, recent)
    probs = np.zeros(np.size(logits), dtype=np.float64)
    probs[ids] = _softmax64(z)
    return probs


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None = None,
           recent: Iterable[int] = ()) -> int:  # [V] -> token id
    """Draw the next token id from `sampling_probs` (no draw when a single token survives).

    logits: float32 [V], the model's for the last position; recent: the ids the repetition
    penalty looks at; rng: consumed only when more than one token survives the filters, so greedy
    decoding needs none. Returns an id in 0 .. V-1. Raises Llama3Error when a draw is needed and
    rng is None. Source: llama.cpp's sampler chain (the module docstring)."""
    ids, z = survivors(logits, params, recent)
    if ids.size == 1:
        return int(ids[0])
    if rng is None:
        raise Llama3Error("sampling draws at random: pass rng, a numpy Generator such as "
                          "np.random.default_rng(seed), or greedy parameters (temperature=0)")
    cdf = np.cumsum(_softmax64(z))
    return int(ids[min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), ids.size - 1)])
