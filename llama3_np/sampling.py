"""Choosing the next token from the logits of the last position: a chain of samplers.

`sampling_probs` builds the distribution the sampler draws from; `sample` draws from it. The
samplers form a chain, as in llama.cpp (`llama_sampler_chain`, `src/llama-sampler.cpp`): each one
acts on the tokens that survived the one before, and every probability it looks at is the softmax
of those survivors only (renormalised), never of the whole vocabulary. Names are llama.cpp's
(`common/sampling.cpp` `common_sampler_type_to_str`); each sampler's rule and source is in the
docstring of its function below:

    penalties    repetition penalty (CTRL), then frequency and presence penalties (`_penalties`)
    dry          DRY, "don't repeat yourself": a penalty on tokens that extend a repeat (`_dry`)
    top_n_sigma  keep logits within n standard deviations of the largest (`_top_n_sigma`)
    top_k        keep the k largest logits (`_top_k`)
    typ_p        locally typical sampling (`_typical`)
    top_p        nucleus sampling (`_top_p`)
    min_p        keep probabilities >= p times the largest (`_min_p`)
    xtc          exclude top choices: at random, drop all but the least of the likely tokens (`_xtc`)
    temperature  divide the logits by T; T = 0 is greedy (`_temperature`)

After the chain, the survivors' softmax is the distribution; a seeded numpy Generator draws from it.
Filters never add tokens back, and only `penalties`, `dry` and `temperature` change logits. The
penalties and DRY look at the ids before the one being drawn (prompt and generated alike, as
llama.cpp's samplers accept them), each over its own window (`repeat_last_n`,
`dry_penalty_last_n`). XTC is the one random filter: it acts when a uniform draw is at most its
probability; `sample` draws it from the same generator as the token (before the token), and
`sampling_probs` takes it as `xtc_draw`, so that a recorded step can be replayed. Where
llama.cpp sets a filtered-out logit to -inf instead of removing it (top-n-sigma, greedy
temperature), llama3_np removes the token: the two agree wherever a later sampler gives -inf
logits probability 0 (all of them but one: llama.cpp's typical sampling computes 0 * log 0 = NaN
for such a token, which makes its entropy NaN; llama3_np's entropy is that of the survivors).

Two orders, with the same samplers:

    llama.cpp (the default)  penalties, dry, top_n_sigma, top_k, typ_p, top_p, min_p, xtc, temperature
        llama.cpp's default `--samplers` (`common/common.h` `common_params_sampling::samplers`,
        built into a chain by `common/sampling.cpp` `common_sampler_init`). Every sampler is in
        the chain; those left at their default values (repetition 1, frequency and presence 0,
        DRY multiplier 0, top-n-sigma -1, typical 1, XTC probability 0) change nothing. Temperature
        comes last, so it only reshapes the survivors: it does not change which tokens top-p and
        min-p keep.
    transformers             penalties, temperature, top_k, top_p, min_p
        Hugging Face `generate` (`GenerationMixin._get_logits_processor`: the
        RepetitionPenaltyLogitsProcessor, then TemperatureLogitsWarper, TopKLogitsWarper,
        TopPLogitsWarper, MinPLogitsWarper). Temperature comes first: a hotter distribution makes
        top-p and min-p keep more tokens. (Hugging Face's top-k keeps every token tied with the
        k-th; here exactly k are kept.)

Any order of any subset can be given by name (`parse_samplers("top_k;top_p;temperature")`,
llama.cpp's `--samplers` syntax, or `parse_sampler_chars("kpt")`, its `--sampling-seq`); a
sampler left out is not applied, as in llama.cpp.

Arithmetic follows the references where a boundary depends on it: logits stay float32 (the
penalties and temperature compute in float32, like llama.cpp and torch), and the unnormalised
probabilities exp(z - max) that top-p, min-p and typical sampling compare are rounded to float32
once (from float64, whose last-bit differences between CPUs lie far below float32's resolution),
as the references' float32 softmax rounds them. A boundary that is exact in their arithmetic
(weights 1, 1/2, 1/4 from the float32 logits 0, ln 1/2, ln 1/4) is then exact here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping, Optional

import numpy as np

from .errors import Llama3Error, ParameterError

SAMPLER_NAMES = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature")

# Order presets, by name (see the module docstring for their sources).
SAMPLER_ORDERS = {
    "llama.cpp": SAMPLER_NAMES,
    "transformers": ("penalties", "temperature", "top_k", "top_p", "min_p"),
}
DEFAULT_SAMPLERS = SAMPLER_ORDERS["llama.cpp"]

# llama.cpp's one-letter names (`common_sampler_type_to_chr`, for --sampling-seq).
SAMPLER_CHARS = {"e": "penalties", "d": "dry", "s": "top_n_sigma", "k": "top_k", "y": "typ_p", "p": "top_p",
                 "m": "min_p", "x": "xtc", "t": "temperature"}
# The samplers llama.cpp has that llama3_np does not (by their llama.cpp names and letters): infill
# needs fill-in-the-middle tokens, adaptive-p replaces the final draw.
_NOT_IMPLEMENTED = {"infill": "i", "adaptive_p": "a"}

# llama.cpp's (`common_params_sampling::dry_sequence_breakers`).
DRY_SEQUENCE_BREAKERS = ("\n", ":", "\"", "*")
# llama.cpp truncates a breaker to 40 bytes and its token tail to 20 tokens (`llama_sampler_init_dry`).
_DRY_MAX_BREAKER_BYTES, _DRY_MAX_TAIL_TOKENS = 40, 20
# ln of float32's largest number: DRY's exponent is capped so that base ** exponent stays finite.
_FLOAT32_MAX_LOG = np.float32(88.7228391)


def _spellings(canonical: str) -> list[str]:
    # llama.cpp's `common_sampler_types_from_names`: a name with '_' is also accepted with '-' and
    # without it ("top-k", "topk")
    return [canonical, canonical.replace("_", "-"), canonical.replace("_", "")]


_NAME_OF = {**{alias: name for name in (*SAMPLER_NAMES, *_NOT_IMPLEMENTED) for alias in _spellings(name)},
            "nucleus": "top_p", "temp": "temperature", "typ": "typ_p"}

# Above this many survivors, top-p first looks for its cut among the largest few (llama.cpp's
# adaptive sort does the same): a full sort of a 128k vocabulary costs more than the forward pass
# of a small model.
_TOP_P_FIRST_LOOK = 256


def _checked_order(names: list[str], text: str) -> tuple[str, ...]:
    choices = f"choose from {', '.join(SAMPLER_NAMES)}, or the order {' or '.join(SAMPLER_ORDERS)}"
    seen: list[str] = []
    for raw, name in names:
        if name is None:
            raise ParameterError("samplers", f"unknown sampler {raw!r} ({choices})")
        if name in _NOT_IMPLEMENTED:
            raise ParameterError("samplers", f"sampler {raw!r} is llama.cpp's but not implemented in llama3_np "
                                             f"({choices})")
        if name in seen:
            raise ParameterError("samplers", f"sampler {name!r} is given twice in {text!r}: each may appear once")
        seen.append(name)
    return tuple(seen)


def parse_samplers(text: str) -> tuple[str, ...]:
    """A sampler order from llama.cpp's `--samplers` syntax: names separated by ';' (for example
    "top_k;top_p;min_p;temperature"; llama.cpp's other spellings too, in any case: "top-k",
    "topk", "nucleus", "temp", "typ"), or an order preset's name ("llama.cpp", "transformers").
    An empty string is the empty chain (softmax of the raw logits).

    Raises ParameterError (parameter "samplers") for an unknown name, a sampler llama3_np does
    not have, an empty name or a name given twice (llama.cpp skips an unknown name with a warning;
    llama3_np refuses it rather than run another chain than the one asked for)."""
    if text in SAMPLER_ORDERS:
        return SAMPLER_ORDERS[text]
    if text.strip() == "":
        return ()
    names = []
    for raw in text.split(";"):
        if raw.strip() == "":
            raise ParameterError("samplers", f"empty sampler name in {text!r}: separate names by a single ';'")
        names.append((raw.strip(), _NAME_OF.get(raw.strip().lower())))
    return _checked_order(names, text)


def parse_sampler_chars(text: str) -> tuple[str, ...]:
    """A sampler order from llama.cpp's `--sampling-seq` syntax: one letter per sampler (e
    penalties, d dry, s top_n_sigma, k top_k, y typ_p, p top_p, m min_p, x xtc, t temperature;
    "edskypmxt" is the default order). Raises ParameterError (parameter "samplers") as `parse_samplers` does."""
    letters = {**SAMPLER_CHARS, **{c: name for name, c in _NOT_IMPLEMENTED.items()}}
    return _checked_order([(c, letters.get(c)) for c in text], text)


def _finite(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and bool(np.isfinite(value))


@dataclass(frozen=True)
class DryBreakers:
    """DRY's sequence breakers as token ids: for each head id, the tails (id sequences) that
    complete a breaker after it; an empty tail means the head token alone is a breaker (its text
    contains a whole breaker). Made from the text of the breakers by `dry_breakers`."""

    strings: tuple[str, ...]
    heads: Mapping[int, tuple[tuple[int, ...], ...]] = field(compare=False, repr=False)

    def single(self, token: int) -> bool:
        return () in self.heads.get(token, ())


def dry_breakers(tokenizer, strings: Iterable[str]) -> DryBreakers:
    """The token sequences that stand for DRY's sequence breakers (`strings`, text) in the
    vocabulary of `tokenizer`, as llama.cpp finds them (`get_overlapping_token_sequences`): a
    token whose text (special tokens by name) contains a breaker is a breaker by itself; a token
    whose text ends with the start of a breaker is a head, completed by the encoding of the rest
    of the breaker (at most 20 tokens). Texts compare as UTF-8 bytes.

    Raises ParameterError ("dry_sequence_breakers") for an empty breaker or one longer than 40
    bytes (llama.cpp skips the first and truncates the second, with a warning)."""
    strings = tuple(strings)
    words = [tokenizer.token_bytes(i) for i in range(tokenizer.n_vocab)]
    heads: dict[int, set[tuple[int, ...]]] = {}
    for text in strings:
        breaker = text.encode("utf-8")
        if not 0 < len(breaker) <= _DRY_MAX_BREAKER_BYTES:
            raise ParameterError("dry_sequence_breakers", f"each DRY sequence breaker must be 1 to "
                                 f"{_DRY_MAX_BREAKER_BYTES} bytes of UTF-8, got {text!r}")
        for token, word in enumerate(words):
            if breaker in word:
                heads.setdefault(token, set()).add(())
                continue
            # the word's last bytes are the breaker's first: the rest of the breaker completes it
            for start in range(max(len(word) - len(breaker) + 1, 0), len(word)):
                if breaker.startswith(word[start:]):
                    rest = breaker[len(word) - start:].decode("utf-8", errors="replace")
                    tail = tuple(tokenizer.encode(rest, bos=False)[:_DRY_MAX_TAIL_TOKENS])
                    heads.setdefault(token, set()).add(tail)
    return DryBreakers(strings, {t: tuple(sorted(tails)) for t, tails in heads.items()})


@dataclass(frozen=True)
class SamplingParams:
    """Defaults follow llama.cpp's command line (`common_params_sampling`): temperature 0.8,
    top-k 40, top-p 0.95, min-p 0.05, and off: no repetition, frequency or presence penalty,
    DRY multiplier 0, top-n-sigma -1, typical 1, XTC probability 0; llama.cpp's order. The
    penalties look at the last 64 ids, DRY too.

    `dry_sequence_breakers` are text; DRY needs them as token ids of the model's vocabulary:
    `for_tokenizer` gives the parameters with them (`dry_breaker_ids`). DRY with breakers and
    without their ids raises ParameterError when a sampler runs.

    Raises ParameterError naming the parameter that is out of range, and the range."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    samplers: tuple[str, ...] = DEFAULT_SAMPLERS
    presence_penalty: float = 0.0  # subtracted once from each token in the penalty window
    frequency_penalty: float = 0.0  # subtracted per occurrence in the penalty window
    typical_p: float = 1.0
    top_n_sigma: float = -1.0
    repeat_last_n: int = 64  # ids the penalties look at; 0 = off, -1 = all they are given
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 64  # ids DRY looks at; 0 = off, -1 = all it is given
    dry_sequence_breakers: tuple[str, ...] = DRY_SEQUENCE_BREAKERS
    dry_breaker_ids: Optional[DryBreakers] = None
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1

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
        # llama.cpp also refuses a penalty whose float32 reciprocal overflows
        if not (np.isfinite(self.repeat_penalty) and np.float32(self.repeat_penalty) > 1 / np.finfo(np.float32).max):
            raise ParameterError("repeat_penalty", f"repeat_penalty must be > 0 and finite (1 = off), "
                                                       f"got {self.repeat_penalty}")
        if not _finite(self.presence_penalty):
            raise ParameterError("presence_penalty", f"presence_penalty must be a finite number, negative to "
                                                     f"favour repeats (0 = off), got {self.presence_penalty}")
        if not _finite(self.frequency_penalty):
            raise ParameterError("frequency_penalty", f"frequency_penalty must be a finite number, negative to "
                                                      f"favour repeats (0 = off), got {self.frequency_penalty}")
        if not (_finite(self.typical_p) and 0 <= self.typical_p <= 1):
            raise ParameterError("typical_p", f"typical_p must be in [0, 1] (1 = off), got {self.typical_p}")
        if not _finite(self.top_n_sigma):
            raise ParameterError("top_n_sigma", f"top_n_sigma must be a finite number, > 0 to filter "
                                                f"(<= 0, such as -1, = off), got {self.top_n_sigma}")
        if not _integer(self.repeat_last_n) or self.repeat_last_n < -1:
            raise ParameterError("repeat_last_n", f"repeat_last_n must be an integer >= 0 (0 = off), or -1 for "
                                                  f"every id before the one drawn, got {self.repeat_last_n}")
        if not _integer(self.dry_penalty_last_n) or self.dry_penalty_last_n < -1:
            raise ParameterError("dry_penalty_last_n", f"dry_penalty_last_n must be an integer >= 0 (0 = off), or "
                                                       f"-1 for every id before the one drawn, "
                                                       f"got {self.dry_penalty_last_n}")
        if not (_finite(self.dry_multiplier) and self.dry_multiplier >= 0):
            raise ParameterError("dry_multiplier", f"dry_multiplier must be >= 0 (0 = off), got {self.dry_multiplier}")
        if not (_finite(self.dry_base) and self.dry_base >= 1):
            raise ParameterError("dry_base", f"dry_base must be a finite number >= 1, got {self.dry_base}")
        if not _integer(self.dry_allowed_length) or self.dry_allowed_length < 0:
            raise ParameterError("dry_allowed_length", f"dry_allowed_length must be an integer >= 0, "
                                                       f"got {self.dry_allowed_length}")
        if isinstance(self.dry_sequence_breakers, str) or any(b == "" for b in self.dry_sequence_breakers):
            raise ParameterError("dry_sequence_breakers", f"dry_sequence_breakers must be a sequence of "
                                 f"non-empty strings, got {self.dry_sequence_breakers!r}")
        if not (_finite(self.xtc_probability) and 0 <= self.xtc_probability <= 1):
            raise ParameterError("xtc_probability", f"xtc_probability must be in [0, 1] (0 = off), "
                                                    f"got {self.xtc_probability}")
        if not (_finite(self.xtc_threshold) and 0 <= self.xtc_threshold <= 1):
            raise ParameterError("xtc_threshold", f"xtc_threshold must be in [0, 1] (above 0.5 = off), "
                                                  f"got {self.xtc_threshold}")
        unknown = [s for s in self.samplers if s not in SAMPLER_NAMES]
        if unknown or len(set(self.samplers)) != len(self.samplers):
            raise ParameterError("samplers", f"samplers must be distinct names from {', '.join(SAMPLER_NAMES)}, "
                                                 f"got {';'.join(self.samplers)!r}")

    @property
    def greedy(self) -> bool:
        """True when the chain keeps a single token (temperature 0 in the chain)."""
        return self.temperature == 0 and "temperature" in self.samplers

    @property
    def dry_on(self) -> bool:
        return "dry" in self.samplers and self.dry_multiplier != 0 and self.dry_penalty_last_n != 0

    @property
    def xtc_on(self) -> bool:
        """Whether XTC is in the chain and can act (llama.cpp: probability > 0, threshold <= 0.5)."""
        return "xtc" in self.samplers and self.xtc_probability > 0 and self.xtc_threshold <= 0.5

    @property
    def history_window(self) -> int:
        """How many of the latest ids the chain looks at (-1: all of them; 0: none)."""
        windows = ([self.repeat_last_n] if "penalties" in self.samplers else []) + \
                  ([self.dry_penalty_last_n] if self.dry_on else [])
        return -1 if -1 in windows else max(windows, default=0)

    def for_tokenizer(self, tokenizer) -> "SamplingParams":
        """These parameters with DRY's sequence breakers as ids of `tokenizer`'s vocabulary
        (computed once per tokenizer and breakers; unchanged when DRY is off or has none)."""
        if not self.dry_on or not self.dry_sequence_breakers:
            return self
        key = (id(tokenizer), self.dry_sequence_breakers)
        if key not in _BREAKER_CACHE:
            _BREAKER_CACHE.clear()  # one tokenizer at a time
            _BREAKER_CACHE[key] = dry_breakers(tokenizer, self.dry_sequence_breakers)
        return replace(self, dry_breaker_ids=_BREAKER_CACHE[key])


_BREAKER_CACHE: dict = {}


def _integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _window(recent: tuple[int, ...], n: int) -> tuple[int, ...]:
    return recent if n == -1 else recent[max(len(recent) - n, 0):]


def _penalties(ids, z, recent, repeat, frequency, presence):
    """Penalties on the tokens of the penalty window (`recent`, the last --repeat-last-n ids),
    each token once however often it occurs there. A seen token's logit z becomes

        z / r if z > 0 else z * r                (CTRL, Keskar et al. 2019, arXiv 1909.05858,
                                                  with the fix for negative logits)
        minus  c * frequency + (c > 0) * presence  (c: its count in the window)

    The second line is OpenAI's definition of the frequency and presence penalties (API reference,
    "Parameter details"), which counts the tokens sampled so far; llama.cpp
    (`llama_sampler_penalties_apply`) counts the window, as llama3_np does. In float32, in that
    order, as llama.cpp computes it. Off when r = 1 and both alphas are 0."""
    if repeat == 1 and frequency == 0 and presence == 0:
        return z
    seen, counts = np.unique(np.fromiter(recent, dtype=np.int64), return_counts=True)
    pos = np.searchsorted(ids, seen)  # ids are ascending
    inside = pos < ids.size
    pos, seen, counts = pos[inside], seen[inside], counts[inside]
    here = ids[pos] == seen  # seen tokens that are still candidates
    pos, counts = pos[here], counts[here]
    r = np.float32(repeat)
    z = z.copy()
    v = np.where(z[pos] > 0, z[pos] / r, z[pos] * r)
    z[pos] = v - (counts.astype(np.float32) * np.float32(frequency) + np.float32(presence))
    return z


def _dry(ids, z, recent, params: SamplingParams):
    """DRY, "don't repeat yourself" (p-e-w, oobabooga/text-generation-webui#5677; llama.cpp
    `llama_sampler_dry_apply`, from koboldcpp): with w the last `dry_penalty_last_n` ids and L
    the allowed length,

    - the repeat limit: the number of ids after the last sequence breaker in w (all of w if none;
      a breaker is a head id followed by one of its tails, `DryBreakers`). Below L: no penalty.
    - for each earlier position i of w, n_i = the length of the longest run of ids ending at i
      that equals the run ending at the end of w, at most the repeat limit. When n_i >= L, the id
      after i, w[i + 1], would extend a repeat of n_i ids: it gets the penalty
      multiplier * base ** (n - L), n the largest such n_i for that id, the exponent capped at
      ln(float32 max) / ln(base); a token that is a breaker by itself is not penalised.

    The penalty is subtracted from the logit (computed in float64, rounded to float32 as
    llama.cpp's `float penalty = multiplier * pow(base, exponent)`). Off for multiplier 0, an empty
    window, or a window of at most L ids."""
    w = _window(tuple(recent), params.dry_penalty_last_n)
    allowed = params.dry_allowed_length
    if len(w) <= allowed:
        return z
    breakers = params.dry_breaker_ids
    if breakers is None:
        if params.dry_sequence_breakers:
            raise ParameterError("dry_sequence_breakers", "DRY's sequence breakers are text: give the parameters "
                                 "the tokenizer's ids for them (SamplingParams.for_tokenizer), or no breakers")
        breakers = DryBreakers((), {})
    back = w[::-1]  # back[k]: the id k places before the last
    limit = len(w)
    for k, token in enumerate(back):
        # the longest tail that follows this head (tails run forward, towards the end of w)
        tails = [t for t in breakers.heads.get(token, ()) if len(t) <= k and all(
            back[k - 1 - j] == t[j] for j in range(len(t)))]
        if tails:
            limit = k - max(len(t) for t in tails)
            break
    if limit < allowed:
        return z
    longest: dict[int, int] = {}
    for k, n in enumerate(_z_function(back)):
        if k == 0:
            continue
        n = min(n, limit)
        nxt = w[len(w) - k]  # the id after the run that ends k ids before the last
        if n >= allowed and n > longest.get(nxt, -1):
            longest[nxt] = n
    base, multiplier = np.float32(params.dry_base), np.float32(params.dry_multiplier)
    cap = int(_FLOAT32_MAX_LOG / np.float32(np.log(base))) if base > np.float32(1.000001) else 0
    z = z.copy()
    pos = np.searchsorted(ids, list(longest)) if longest else []
    for p, (token, n) in zip(pos, longest.items()):
        if p < ids.size and ids[p] == token and not breakers.single(token):
            exponent = n - allowed if cap <= 0 else min(n - allowed, cap)
            z[p] -= np.float32(np.float64(multiplier) * np.float64(base) ** exponent)
    return z


def _z_function(s: tuple[int, ...]) -> list[int]:
    # z[k]: the length of the longest common prefix of s and s[k:] (Gusfield 1997, section 1.4),
    # in linear time: a match found earlier, s[left:right] == s[:right - left], gives a lower bound.
    z = [0] * len(s)
    left = right = 0
    for k in range(1, len(s)):
        if k < right:
            z[k] = min(right - k, z[k - left])
        while k + z[k] < len(s) and s[z[k]] == s[k + z[k]]:
            z[k] += 1
        if k + z[k] > right:
            left, right = k, k + z[k]
    return z


def _xtc(ids, z, threshold, draw):
    """XTC, exclude top choices (p-e-w, oobabooga/text-generation-webui#6335; llama.cpp
    `llama_sample_xtc_apply`): when the uniform `draw` is <= the probability (`sample` makes the
    draw) and at least two survivors have probability >= threshold, all of those but the least
    probable are removed. Survivors' probabilities are rounded as top-p's are; on equal
    probabilities the lower id counts as the more probable (llama.cpp's sort leaves that open)."""
    if draw is None or z.size < 2:
        return ids, z
    w = _weights32(z)
    order = _most_probable_first(z, ids)
    above = int(np.sum(w[order] / w.sum() >= np.float32(threshold)))  # the most probable come first
    if above < 2:
        return ids, z
    keep = np.sort(order[above - 1:])
    return ids[keep], z[keep]


def _weights32(z: np.ndarray) -> np.ndarray:
    # [n] float32 logits -> [n] float64 holding float32 values: exp(z - max z), rounded to float32
    # once (see the module docstring).
    top = z.max()
    return np.exp(z.astype(np.float64) - np.float64(top)).astype(np.float32).astype(np.float64)


def _most_probable_first(z: np.ndarray, ids: np.ndarray) -> np.ndarray:
    # positions into z, largest logit first, lower id first on equal logits
    return np.lexsort((ids, -z))


def _top_n_sigma(ids, z, n):
    """Top-n-sigma (Tang et al. 2024, arXiv 2411.07641; llama.cpp `llama_sampler_top_n_sigma_apply`):
    keep the tokens whose logit is >= max - n * sigma, sigma the standard deviation (over N, not
    N - 1) of the survivors' finite logits; the largest is always kept. Off for n <= 0 or a single
    survivor. The mean and sigma are computed in float64, the threshold in float32 as llama.cpp
    does (its float32 sums differ from float64's in the last bits, which moves the threshold by
    about n * 1e-7 * sigma)."""
    if n <= 0 or z.size <= 1:
        return ids, z
    finite = z[np.isfinite(z)].astype(np.float64)
    if finite.size == 0:
        return ids, z
    sigma = np.float32(np.sqrt(np.mean((finite - finite.mean()) ** 2)))
    keep = z >= np.float32(finite.max()) - np.float32(n) * sigma
    return ids[keep], z[keep]


def _top_k(ids, z, k):
    """Keep the k largest logits (k = 0 or k >= the survivors: keep all); on equal logits the
    lower id is kept (llama.cpp `llama_sampler_top_k_impl` keeps an unspecified one of them)."""
    if k == 0 or k >= z.size:
        return ids, z
    kth = z[np.argpartition(-z, k - 1)[k - 1]]  # the k-th largest logit, without a full sort
    keep = z > kth
    ties = np.flatnonzero(z == kth)[: k - int(keep.sum())]  # lower ids first: ids are ascending
    keep[ties] = True
    return ids[keep], z[keep]


def _top_p(ids, z, p):
    """Nucleus sampling (Holtzman et al. 2020, arXiv 1904.09751; llama.cpp
    `llama_sampler_top_p_apply`): keep the smallest set of most probable survivors whose mass
    reaches p: token i (most probable first) is kept when the mass before it is < p, so at an
    exact boundary the token that completes p is the last one kept (llama.cpp `cum_sum >= p`).
    p = 1: keep all; at least one is kept."""
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


def _typical(ids, z, p):
    """Locally typical sampling (Meister et al. 2023, arXiv 2202.00666; llama.cpp
    `llama_sampler_typical_apply`): with the survivors' probabilities p_i and their entropy
    H = -sum p_i ln p_i, rank the tokens by |-ln p_i - H| (the most typical first) and keep them
    in that order until their mass exceeds p: token i is kept when the mass before it is <= p, so
    at an exact boundary one more token is kept than top-p would (llama.cpp `cum_sum > p`, where
    top-p has `>=`). p = 1: keep all; at least one is kept. On equal scores the more probable,
    then the lower id comes first (llama.cpp's `std::sort` leaves that order unspecified)."""
    if p >= 1 or z.size == 1:
        return ids, z
    w = _weights32(z)
    probs = w / w.sum()
    with np.errstate(divide="ignore"):
        surprise = -np.log(probs)  # +inf for a -inf logit
    entropy = float(np.sum(probs[probs > 0] * surprise[probs > 0]))
    order = np.lexsort((ids, -z, np.abs(surprise - entropy)))
    n = min(int(np.searchsorted(np.cumsum(probs[order]), np.float32(p), side="right")) + 1, z.size)
    keep = np.sort(order[:n])
    return ids[keep], z[keep]


def _min_p(ids, z, p):
    """Keep survivors whose probability is >= p times the largest survivor's (Nguyen et al. 2024,
    arXiv 2407.01082; llama.cpp `llama_sampler_min_p_apply`); the largest is always kept."""
    if p <= 0:
        return ids, z
    keep = _weights32(z) >= p  # p_i / p_max = exp(z_i - z_max)
    return ids[keep], z[keep]


def _temperature(ids, z, t):
    """Divide the survivors' logits by T in float32; T = 0 keeps only the largest (greedy; the
    lower id on equal logits), as llama.cpp's `llama_sampler_temp_impl`."""
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


def survivors(logits: np.ndarray, params: SamplingParams, recent: Iterable[int] = (),
              xtc_draw: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
    # [V] -> ([n] ids ascending, [n] float32 logits)
    """Run the chain `params.samplers`: the ids that survive and their final logits (after
    penalties, DRY and temperature). Their softmax is the distribution `sample` draws from.
    recent: the ids before the one drawn (the last `params.history_window` at least); xtc_draw:
    XTC's uniform draw in [0, 1) (None: XTC does not act)."""
    z = np.array(logits, dtype=np.float32).reshape(-1)
    ids = np.arange(z.size)
    recent = tuple(int(i) for i in recent)
    # These filters keep their input's most probable token, and temperature 0 keeps only that one:
    # with temperature 0, they cannot change the outcome before it, and after it nothing is left
    # to filter. (Typical sampling and XTC may drop the most probable token, so they always run.)
    skip_filters = params.greedy
    for name in params.samplers:
        if name == "penalties":
            if params.repeat_last_n != 0:
                z = _penalties(ids, z, _window(recent, params.repeat_last_n), params.repeat_penalty,
                               params.frequency_penalty, params.presence_penalty)
        elif name == "dry":
            if params.dry_on:
                z = _dry(ids, z, recent, params)
        elif name == "temperature":
            ids, z = _temperature(ids, z, params.temperature)
            skip_filters = False
        elif name == "typ_p":
            ids, z = _typical(ids, z, params.typical_p)
        elif name == "xtc":
            if params.xtc_on and xtc_draw is not None and xtc_draw <= np.float32(params.xtc_probability):
                ids, z = _xtc(ids, z, params.xtc_threshold, xtc_draw)
        elif skip_filters:
            continue
        elif name == "top_n_sigma":
            ids, z = _top_n_sigma(ids, z, params.top_n_sigma)
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


def sampling_probs(logits: np.ndarray, params: SamplingParams, recent: Iterable[int] = (),
                   xtc_draw: Optional[float] = None) -> np.ndarray:
    # [V] -> [V]
    """The distribution `sample` draws from: float64, zeros for filtered-out tokens, sums to 1.
    `xtc_draw` as `survivors` takes it (`sample` draws it: `xtc_draw`)."""
    ids, z = survivors(logits, params, recent, xtc_draw)
    probs = np.zeros(np.size(logits), dtype=np.float64)
    probs[ids] = _softmax64(z)
    return probs


def xtc_draw(params: SamplingParams, rng: Optional[np.random.Generator]) -> Optional[float]:
    """XTC's uniform draw in [0, 1) for one step, from `rng` (None when XTC is off: no draw).
    llama.cpp draws from a generator of XTC's own, only when two tokens or more reach XTC.
    Raises Llama3Error when XTC is on and rng is None."""
    if not params.xtc_on:
        return None
    if rng is None:
        raise Llama3Error("XTC draws at random: pass rng, a numpy Generator such as np.random.default_rng(seed)")
    return float(rng.random())


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None = None,
           recent: Iterable[int] = (), xtc: Optional[float] = None) -> int:  # [V] -> token id
    """Draw the next token id from `sampling_probs` (no draw when a single token survives).

    logits: float32 [V], the model's for the last position; recent: the ids before it (the
    penalties and DRY look at the last `params.history_window`); rng: consumed only when more
    than one token survives the filters, so greedy decoding needs none, and first for XTC's draw
    unless `xtc` gives it (`xtc_draw`, for a caller that records it). Returns an id in 0 .. V-1.
    Raises Llama3Error when a draw is needed and rng is None. Source: llama.cpp's sampler chain
    (the module docstring)."""
    ids, z = survivors(logits, params, recent, xtc_draw(params, rng) if xtc is None else xtc)
    if ids.size == 1:
        return int(ids[0])
    if rng is None:
        raise Llama3Error("sampling draws at random: pass rng, a numpy Generator such as "
                          "np.random.default_rng(seed), or greedy parameters (temperature=0)")
    cdf = np.cumsum(_softmax64(z))
    return int(ids[min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), ids.size - 1)])
