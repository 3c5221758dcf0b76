"""Generation: prefill the prompt once, then decode one token at a time through the KV cache.

A `Session` owns one KV cache, so a chat can keep feeding it turn after turn instead of re-reading
the whole dialog. Text is not handled here: token ids in, token ids out (`on_token` streams them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional

import numpy as np

from .config import ModelConfig
from .errors import Llama3Error, ParameterError
from .model import KVCache, forward
from .sampling import SamplingParams, sample

# Like llama.cpp's `repeat_last_n`: the repetition penalty looks at this many most recent tokens.
REPEAT_LAST_N = 64

# A prompt goes through the model this many tokens at a time, each chunk attending to the cache
# the earlier ones filled (like llama.cpp's batches). The logits are the same as in one call, but
# attention computes only the causal half of the scores block by block, and its largest array
# ([H, chunk, cached + chunk] scores) stays small for long prompts. Measured on the default model,
# 512-token prompt: 158 tok/s in one call, 172 in chunks of 256, 169 in chunks of 128.
PREFILL_CHUNK = 256


@dataclass
class Generation:
    """What one `Session.generate` call produced."""

    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)  # generated ids, including a final stop token
    stop_reason: str = ""  # "stop" (a stop token), "length" (-n or the context), "interrupted"
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

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
    """A model and one KV cache of `ctx` tokens; positions continue from call to call."""

    def __init__(self, weights: Mapping[str, np.ndarray], config: ModelConfig, ctx: int):
        if ctx <= 0:
            raise ParameterError("ctx", f"must be positive, got {ctx}")
        self.weights, self.config = weights, config
        self.cache = KVCache(config, ctx)
        self.history: list[int] = []  # every id fed to the model so far, in order

    @property
    def ctx(self) -> int:
        return self.cache.max_len

    def recent_ids(self) -> list[int]:
        """The window the repetition penalty looks at: the last REPEAT_LAST_N ids fed so far
        (prompt and generated tokens alike; every sampled token is fed before the next is drawn)."""
        return self.history[-REPEAT_LAST_N:]

    def feed(self, ids: list[int]) -> np.ndarray:  # [T] -> [V]
        """Run `ids` through the model after what the cache holds; the last token's logits."""
        for start in range(0, max(len(ids), 1), PREFILL_CHUNK):  # no ids: forward says so
            chunk = ids[start:start + PREFILL_CHUNK]
            logits = forward(self.weights, self.config, chunk, self.cache, pos=self.cache.length, last_only=True)
        self.history.extend(int(i) for i in ids)
        return logits[0]

    def generate(self, prompt_ids: list[int], params: SamplingParams, rng: np.random.Generator,
                 max_new: int, stop_ids: Iterable[int] = (),
                 on_token: Optional[Callable[[int], None]] = None) -> Generation:
        """Feed the prompt, then sample up to `max_new` tokens (-1: until a stop token or the
        context is full). Ctrl-C ends it early with stop_reason "interrupted"."""
        prompt_ids = [int(i) for i in prompt_ids]
        if max_new == 0 or max_new < -1:
            raise ParameterError("max_new", f"must be >= 1, or -1 for no limit, got {max_new}")
        if not prompt_ids:
            raise Llama3Error("the prompt is empty: give some text or token ids")
        free = self.ctx - self.cache.length
        if len(prompt_ids) > free:
            raise Llama3Error(f"the prompt has {len(prompt_ids)} tokens but only {free} of the "
                              f"{self.ctx}-token context are free: shorten it or use a larger context")
        stop_ids = set(int(i) for i in stop_ids)
        out = Generation(prompt_ids=prompt_ids)
        try:
            t0 = time.perf_counter()
            logits = self.feed(prompt_ids)
            out.prefill_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            while True:
                token = sample(logits, params, rng, recent=self.recent_ids())
                out.ids.append(token)
                if on_token is not None:
                    on_token(token)
                if token in stop_ids:
                    out.stop_reason = "stop"
                    break
                if len(out.ids) == max_new or self.cache.length == self.ctx:
                    out.stop_reason = "length"
                    break
                logits = self.feed([token])
        except KeyboardInterrupt:
            out.stop_reason = "interrupted"
        finally:
            out.decode_seconds = time.perf_counter() - t0
        return out
