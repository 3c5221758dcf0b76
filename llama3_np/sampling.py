"""Choosing the next token from the logits of the last position.

`sampling_probs` builds the distribution the sampler draws from; `sample` draws from it. The
filters are applied in one fixed order, the order of Hugging Face `generate` and of Meta's
reference (which has temperature and top-p only):

    1. repetition penalty  on logits of recently seen tokens: positive ones divided by r,
                           negative ones multiplied by r (the CTRL rule, as in llama.cpp and HF)
    2. temperature         logits / T, then softmax
    3. top-k               keep the k most probable tokens (k = 0: no limit)
    4. top-p               keep the smallest set of most probable tokens whose mass reaches p
    5. min-p               drop tokens whose probability is below p × the largest probability
    6. renormalise and draw with a seeded numpy Generator

Temperature 0 means greedy: the most probable token (the lowest id on ties); the filters then
cannot change the choice and are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .errors import ParameterError


@dataclass(frozen=True)
class SamplingParams:
    """Defaults follow llama.cpp's command line."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0

    def __post_init__(self):
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ParameterError("temperature", f"must be a number >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ParameterError("top_k", f"must be an integer >= 0 (0 = off), got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise ParameterError("top_p", f"must be in (0, 1] (1 = off), got {self.top_p}")
        if not (0 <= self.min_p < 1):
            raise ParameterError("min_p", f"must be in [0, 1) (0 = off), got {self.min_p}")
        if not (self.repeat_penalty > 0 and np.isfinite(self.repeat_penalty)):
            raise ParameterError("repeat_penalty", f"must be a number > 0 (1 = off), got {self.repeat_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repeat_penalty(logits: np.ndarray, recent: Iterable[int], penalty: float) -> np.ndarray:
    # [V] -> [V]
    """Make recently seen tokens less likely: divide positive logits by `penalty`, multiply
    negative ones (each seen token once, however often it was seen)."""
    out = np.array(logits, dtype=np.float32)
    seen = np.unique(np.fromiter(recent, dtype=np.int64))
    if penalty != 1 and seen.size:
        z = out[seen]
        out[seen] = np.where(z > 0, z / penalty, z * penalty)
    return out


def sampling_probs(logits: np.ndarray, params: SamplingParams, recent: Iterable[int] = ()) -> np.ndarray:
    # [V] -> [V]
    """The distribution `sample` draws from (zeros for filtered-out tokens; sums to 1)."""
    z = apply_repeat_penalty(logits, recent, params.repeat_penalty).astype(np.float64)
    if params.greedy:
        probs = np.zeros_like(z)
        probs[int(np.argmax(z))] = 1.0
        return probs
    z = z / params.temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()

    # Most probable first, lower id first on ties. Sorting the logits, not the probabilities,
    # keeps the argmax first even when exp() rounds two close logits to the same probability.
    order = np.argsort(-z, kind="stable")
    keep = np.ones(probs.size, dtype=bool)  # in `order`'s order
    if params.top_k:
        keep[params.top_k:] = False
    if params.top_p < 1:
        mass_before = np.cumsum(probs[order]) - probs[order]
        keep &= mass_before < params.top_p
    if params.min_p > 0:
        keep &= probs[order] >= params.min_p * probs[order[0]]
    out = np.zeros_like(probs)
    out[order[keep]] = probs[order[keep]]
    return out / out.sum()


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
           recent: Iterable[int] = ()) -> int:  # [V] -> token id
    """Draw the next token id (greedy when params.temperature is 0)."""
    probs = sampling_probs(logits, params, recent)
    if params.greedy:
        return int(np.argmax(probs))
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), probs.size - 1))
