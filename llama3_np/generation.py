"""Generation: prefill the prompt once, then decode one token at a time through the KV cache.

A `Session` owns one KV cache and `history`, the ids that cache holds, in order; a chat keeps
feeding it turn after turn instead of re-reading the whole dialog. Whatever ends a generation (a
stop token, the length limit, a full context, an exception such as Ctrl-C's KeyboardInterrupt at
any point), the cache holds exactly the ids `history` lists.

`Session.generate` returns a `Generation`; iterating it runs the model and yields one `Step` per
generated token (the id, and the logits and sampler settings it was drawn from), so printing,
explaining and chatting are loops over the same records. Text is not handled here: token ids in,
token ids out (`LoadedModel.generate`, `stream` and `chat` are the text-level calls). What to do
on Ctrl-C is the caller's decision: a KeyboardInterrupt goes through.

Safe by default, as Meta's `llama-models` and `mlx-lm` are: a generation ends at the session's
end-of-generation ids unless the call says otherwise (`LoadedModel.session` gives a session the
model's, `LoadedModel.stop_ids`), runs greedy unless given sampling parameters, and needs a random
generator only when it samples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple, Optional

import numpy as np

from .checks import check_parallel
from .config import ComputeMode, ModelConfig
from .errors import Llama3Error, ParameterError
from .model import KVCache, forward, forward_batch
from .sampling import SamplingParams, sample, sampling_probs, xtc_draw

# How many of the latest ids the penalties look at by default (llama.cpp's `repeat_last_n`): the
# sampling parameters' (`SamplingParams.repeat_last_n`).
REPEAT_LAST_N = SamplingParams.repeat_last_n

# A prompt goes through the model this many tokens at a time, each chunk attending to the cache
# the earlier ones filled (like llama.cpp's batches). The logits are the same as in one call, but
# attention computes only the causal half of the scores block by block, and its largest array
# ([H, chunk, cached + chunk] scores) stays small for long prompts. Measured on the default model,
# 512-token prompt: 158 tok/s in one call, 172 in chunks of 256, 169 in chunks of 128.
PREFILL_CHUNK = 256

# What `generate` samples with when given no parameters: greedy, as mlx-lm's generate.
GREEDY = SamplingParams(temperature=0)


def session_size(ctx: int, prompt_tokens: int, max_new: int) -> int:
    """The tokens a session's KV cache needs for a prompt of `prompt_tokens` and up to `max_new`
    new tokens (-1: until the context is full) in a context of `ctx`: room for the prompt and the
    new tokens, never more than the context."""
    return ctx if max_new < 0 else min(ctx, prompt_tokens + max_new)


def suppress(logits: np.ndarray, ids: frozenset[int]) -> np.ndarray:  # [V] -> [V]
    """`logits` with `ids` at -inf, so that no sampler can draw them (llama.cpp's logit bias of
    -inf on every end-of-generation token, which is what its --ignore-eos does)."""
    if not ids:
        return logits
    out = np.array(logits, dtype=np.float32)
    out[sorted(ids)] = -np.inf
    return out


# The model's own distribution: every sampler off (what `Step.candidates` ranks by).
PLAIN = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)


@dataclass(frozen=True)
class Candidate:
    """One token a step could have drawn: its rank by the model's probability (1 = most probable,
    the lower id first on equal logits), its logit, that probability, and the probability the
    sampler gave it after its filters (`Step.probs`)."""

    rank: int
    id: int
    logit: float
    p: float
    sampled_p: float


@dataclass(frozen=True)
class Step:
    """One generated token and everything it was drawn from."""

    token: int
    logits: np.ndarray  # [V] float32: the model's logits for the position this token fills
    params: SamplingParams
    recent: tuple[int, ...]  # the ids before it that the samplers looked at (`params.history_window`)
    suppressed: frozenset[int] = frozenset()  # ids the draw could not choose (ignore_eos)
    xtc_draw: Optional[float] = None  # XTC's draw at this step (None: XTC off)

    def sampler_logits(self) -> np.ndarray:  # -> [V]
        """The logits the sampler was given: the model's, with suppressed ids at -inf."""
        return suppress(self.logits, self.suppressed)

    def probs(self) -> np.ndarray:  # -> [V] float64
        """The distribution the token was drawn from (`sampling_probs` of what `sample` saw)."""
        return sampling_probs(self.sampler_logits(), self.params, self.recent, self.xtc_draw)

    def candidates(self, k: int) -> list[Candidate]:
        """The `k` most probable tokens by the model's own distribution, most probable first, and
        the token drawn after them when it ranks lower (what `llama3-np generate --explain` shows).
        Raises ParameterError("k") when k < 1."""
        if k < 1:
            raise ParameterError("k", f"the number of candidates must be >= 1, got {k}")
        p = sampling_probs(self.logits, PLAIN)  # [V]
        sampled = self.probs()  # [V]
        order = np.argsort(-self.logits, kind="stable")  # [V]: most probable first, lower id first on ties
        rank = np.empty(order.size, dtype=np.int64)
        rank[order] = np.arange(1, order.size + 1)
        shown = [int(t) for t in order[:k]] + ([self.token] if rank[self.token] > k else [])
        return [Candidate(int(rank[t]), t, float(self.logits[t]), float(p[t]), float(sampled[t])) for t in shown]


class Generation:
    """One `Session.generate` call. Iterate it (once) to run it; its fields fill as it runs."""

    def __init__(self, session: "Session", prompt_ids: list[int], params: SamplingParams,
                 rng: Optional[np.random.Generator], max_new: int, stop_ids: frozenset[int], suppressed: frozenset[int]):
        self.session = session
        self.prompt_ids = prompt_ids
        # How its tokens are drawn and when it ends (`Session.generate`'s arguments).
        self.params, self.rng, self.max_new = params, rng, max_new
        self.stop_ids, self.suppressed = stop_ids, suppressed
        self.start = session.cache.length  # what the session held before this prompt
        self.ids: list[int] = []  # generated ids so far, including a final stop token
        # "stop" (a stop token), "length" (max_new tokens), "context" (a full context); "" while
        # running and when the caller left the loop early (the command line records "interrupted";
        # a caller that found a stop string in the text, `text.stop`, records "stop_string").
        self.stop_reason = ""
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0
        self._steps: Iterator[Step] = iter(())  # set by Session.generate

    def __iter__(self) -> Iterator[Step]:
        return self._steps

    def run(self) -> "Generation":
        """Run to the end without looking at the steps."""
        for _ in self:
            pass
        return self

    @property
    def prompt_fed(self) -> bool:
        """Whether the whole prompt is in the session's cache (an interrupted prefill is not)."""
        return self.session.cache.length >= self.start + len(self.prompt_ids)

    @property
    def unfed_ids(self) -> list[int]:
        """Generated ids the cache does not hold: the last one drawn (a stop token, or the token
        drawn when the limit was reached) until something feeds it; [] when it was fed."""
        fed = self.session.cache.length - self.start - len(self.prompt_ids)
        return self.ids[fed:] if fed >= 0 else list(self.ids)

    @property
    def text_ids(self) -> list[int]:
        """The generated ids without the stop token that ended them."""
        return self.ids[:-1] if self.stop_reason == "stop" else self.ids

    @property
    def prefill_tokens_per_second(self) -> float:
        return len(self.prompt_ids) / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # The first generated token comes from the prefill's logits; each later one costs a step.
        steps = max(len(self.ids) - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0


class Session:
    """A model and one KV cache of `ctx` tokens; positions continue from call to call.

    stop_ids: the ids that end a generation unless `generate` is told otherwise. Bare weights
    carry no tokenizer, so a Session made from them knows none; `LoadedModel.session` passes the
    model's end-of-generation ids. progress: for a prompt fed in more than one chunk, called as
    progress(0, total) before the first and progress(done, total) after each (a progress display).
    compute: the compute mode of every forward pass (`config.ComputeMode` or its name; a
    `LoadedModel`'s `compute` for the weights it holds).
    """

    def __init__(self, weights: Mapping[str, np.ndarray], config: ModelConfig, ctx: int,
                 stop_ids: Iterable[int] = (), progress: Optional[Callable[[int, int], None]] = None,
                 compute: str | ComputeMode = "float32"):
        if ctx <= 0:
            raise ParameterError("ctx", f"ctx must be positive, got {ctx}")
        self.weights, self.config = weights, config
        self.cache = KVCache(config, ctx, compute)  # the compute mode travels with the cache
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.progress = progress
        # Ids handed to the model, in order. The cache's first `length` slots hold the first
        # `length` of them; any after those were being fed when something stopped the forward
        # pass, and are not part of `history`.
        self._fed: list[int] = []

    @property
    def ctx(self) -> int:
        return self.cache.max_len

    @property
    def history(self) -> list[int]:
        """Every id the KV cache holds, in order (a copy)."""
        return self._fed[:self.cache.length]

    def recent_ids(self, n: int) -> list[int]:
        """The last `n` ids the cache holds (-1: all of them), what the samplers look at (prompt
        and generated tokens alike; every sampled token is fed before the next is drawn)."""
        end = self.cache.length
        return self._fed[:end] if n == -1 else self._fed[max(end - n, 0):end]

    def feed(self, ids: Iterable[int]) -> np.ndarray:  # [T] -> [V]
        """Run `ids` through the model after what the cache holds; the last token's logits.

        They go in chunks of PREFILL_CHUNK; if a chunk does not complete (an exception, Ctrl-C),
        the cache and `history` hold the chunks before it.
        """
        ids = self._to_feed(ids)
        progress = self.progress if len(ids) > PREFILL_CHUNK else None
        for start in range(0, len(ids), PREFILL_CHUNK):
            if progress is not None:
                progress(start, len(ids))
            logits = forward(self.weights, self.config, ids[start:start + PREFILL_CHUNK], self.cache,
                             last_only=True)
        if progress is not None:
            progress(len(ids), len(ids))
        return logits[0]

    def _to_feed(self, ids: Iterable[int]) -> list[int]:
        """`ids` as ints, recorded as being fed: `history` takes them as the cache does, chunk by chunk."""
        ids = [int(i) for i in ids]
        if not ids:
            raise Llama3Error("feed needs at least one token id")
        del self._fed[self.cache.length:]
        self._fed.extend(ids)
        return ids

    def rollback(self, length: int) -> None:
        """Forget everything after the first `length` ids of `history`."""
        if not 0 <= length <= self.cache.length:
            raise Llama3Error(f"cannot roll back to {length} tokens: the session holds {self.cache.length}")
        self.cache.length = length

    def generate(self, prompt_ids: Iterable[int], params: Optional[SamplingParams] = None,
                 rng: Optional[np.random.Generator] = None, max_new: int = -1,
                 stop_ids: Optional[Iterable[int]] = None, suppress_ids: Iterable[int] = ()) -> Generation:
        """A generation that feeds `prompt_ids` after what the session holds, then draws up to
        `max_new` tokens (-1: until a stop token or a full context; 0: none, the prompt is only
        fed, as llama.cpp's `-n 0` evaluates it), ending after a token of
        `stop_ids` (None: the session's own, `Session.stop_ids`; () for none). `params` None is
        greedy (`GREEDY`); `rng` draws the sampled tokens and is needed only when `params` sample.
        `suppress_ids` are never drawn (llama.cpp's --ignore-eos: the end-of-generation ids get a
        logit of -inf). Nothing runs until the returned `Generation` is iterated.

        The prompt enters the cache whole or not at all: an exception while it is fed (Ctrl-C)
        rolls the session back. Each drawn token is fed when the next step is asked for, so after
        the last step (or when the caller stops asking) it is not in the cache:
        `Generation.unfed_ids`.

        Raises Llama3Error when max_new is below -1, or the prompt is empty or does not fit
        the free part of the context; iterating raises it when `params` sample without an `rng`.
        """
        prompt_ids = [int(i) for i in prompt_ids]
        params = GREEDY if params is None else params
        if max_new < -1:
            raise ParameterError("max_new", f"max_new must be >= 0, or -1 for no limit, got {max_new}")
        if not prompt_ids:
            raise Llama3Error("the prompt is empty: give some text or token ids")
        free = self.ctx - self.cache.length
        if len(prompt_ids) > free:
            raise Llama3Error(f"the prompt has {len(prompt_ids)} tokens but only {free} of the "
                              f"{self.ctx}-token context are free: shorten it or use a larger context")
        stop_ids = self.stop_ids if stop_ids is None else frozenset(int(i) for i in stop_ids)
        suppress_ids = frozenset(int(i) for i in suppress_ids)
        out = Generation(self, prompt_ids, params, rng, max_new, stop_ids, suppress_ids)
        out._steps = self._steps(out)
        return out

    def _steps(self, out: Generation) -> Iterator[Step]:
        t0 = time.perf_counter()
        try:
            logits = self.feed(out.prompt_ids)
        except BaseException:
            self.rollback(out.start)
            raise
        out.prefill_seconds = time.perf_counter() - t0
        if out.max_new == 0:
            out.stop_reason = "length"
            return
        t0 = time.perf_counter()
        while True:
            step = self._draw(out, logits)
            out.decode_seconds = time.perf_counter() - t0
            yield step
            if out.stop_reason:
                return
            logits = self.feed([step.token])

    def _draw(self, out: Generation, logits: np.ndarray) -> Step:
        """The next token of `out` from the logits of the last id fed, and whether it ends `out`."""
        params = out.params
        recent = tuple(self.recent_ids(params.history_window))
        draw = xtc_draw(params, out.rng)
        token = sample(suppress(logits, out.suppressed), params, out.rng, recent=recent, xtc=draw)
        out.ids.append(token)
        if token in out.stop_ids:
            out.stop_reason = "stop"
        elif len(out.ids) == out.max_new:
            out.stop_reason = "length"
        elif self.cache.length == self.ctx:
            out.stop_reason = "context"
        return Step(token, logits, params, recent, out.suppressed, draw)


class _Running(NamedTuple):
    """A generation of a batch (`generate_batch`) and where it is in the order of the input."""

    index: int
    out: Generation


def generate_batch(generations: Iterable[Generation], parallel: int,
                   on_step: Optional[Callable[[int, Step], bool]] = None) -> Iterator[Generation]:
    """Run many generations together, up to `parallel` at a time, each step of all of them in one
    `model.forward_batch` (every weight read once per step for all); yield each finished one in
    the order of `generations`, as soon as it and those before it are done.

    generations: made by `Session.generate` (each on a session of its own, of one model, not yet
    iterated); read lazily, so a long input holds only `parallel` KV caches at a time. A
    generation joins as soon as one ends (continuous batching, as llama.cpp's `-cb`): its prompt
    is fed in chunks of PREFILL_CHUNK beside the others' decode steps. Each generation draws
    its tokens exactly as when iterated alone (its own parameters, random generator, stop ids,
    limit and context), and its logits are its logits alone within float32 rounding
    (`model.forward_batch`), so greedy ids are the same. on_step(i, step): called with the index
    of the generation and each step drawn; a true result ends that generation there (its
    `stop_reason` is then "stop_string": the caller found a stop string).
    Raises ParameterError("parallel") when parallel is not an integer >= 1, Llama3Error when the
    generations are not of one model or one was already run.
    """
    check_parallel(parallel)
    pending = enumerate(generations)
    running: list[_Running] = []
    feeds: dict[int, list[int]] = {}  # what each running generation feeds next
    since: dict[int, float] = {}  # when its prompt began to be fed, then when its decoding began
    done: dict[int, Generation] = {}
    model, yielded = None, 0
    while True:
        while len(running) < parallel and (item := next(pending, None)) is not None:
            index, out = item
            model = model or (out.session.weights, out.session.config)
            if out.session.weights is not model[0] or out.session.config != model[1]:
                raise Llama3Error(f"generation {index} of the batch is of another model: a batch runs one model")
            if out.ids or out.session.cache.length != out.start:
                raise Llama3Error(f"generation {index} of the batch has already run")
            out._steps = iter(())  # it runs here, not by being iterated
            running.append(_Running(index, out))
            feeds[index], since[index] = list(out.prompt_ids), time.perf_counter()
        if not running:
            return
        chunks = [r.out.session._to_feed(feeds[r.index][:PREFILL_CHUNK]) for r in running]
        logits = forward_batch(*model, chunks, [r.out.session.cache for r in running], last_only=True)  # B x [1, V]
        still = []
        for r, last in zip(running, logits):
            out, i = r.out, r.index
            del feeds[i][:PREFILL_CHUNK]
            if feeds[i]:  # more of its prompt to feed
                still.append(r)
                continue
            now = time.perf_counter()
            if not out.ids:  # its prompt is in: decoding begins
                out.prefill_seconds, since[i] = now - since[i], now
                if out.max_new == 0:  # the prompt only
                    out.stop_reason, done[i] = "length", out
                    continue
            step = out.session._draw(out, last[0])
            if on_step is not None and on_step(i, step) and not out.stop_reason:
                out.stop_reason = "stop_string"
            out.decode_seconds = time.perf_counter() - since[i]
            if out.stop_reason:
                done[i] = out
            else:
                feeds[i] = [step.token]
                still.append(r)
        running = still
        while yielded in done:
            yield done.pop(yielded)
            yielded += 1

