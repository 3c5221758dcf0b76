"""Perplexity by llama.cpp's method, and KL divergence against the logits of another run.

llama.cpp's `llama-perplexity` (the numbers people quote for quantized models) does this:
  1. tokenize the whole text once (with BOS in front when the model adds one);
  2. cut the ids into windows of `ctx` tokens, window i = ids[i·ctx : (i+1)·ctx], dropping the
     tail; the first token of every window is replaced by BOS when the model adds one;
  3. run each window from an empty KV cache (positions 0 .. ctx-1), in batches of `batch` tokens;
     a batch of several windows' tokens (`batch` a multiple of `ctx`) runs batch/ctx windows in
     one pass (llama.cpp's n_seq; `model.forward_batch`: each weight read once for all of them);
  4. score only the second half: the logits at positions ctx/2 .. ctx-2 predict tokens
     ctx/2+1 .. ctx-1, so that every scored token sees at least ctx/2 tokens of context (only
     their logits are computed: the output product runs for those rows alone, as llama.cpp asks
     for those logits alone, `forward_batch`'s logits_rows);
  5. PPL = exp(mean negative log-likelihood); its standard error, by the delta method, is
     PPL · sqrt((mean(nll²) - mean(nll)²) / (N - 1)).
At least 2·ctx tokens are needed (llama.cpp refuses fewer).

KL divergence: the scored logits of a run can be saved (`LogitsWriter`: a safetensors file with a
float32 tensor `logits` [N, V] and the window tokens in its metadata) and a later run, or another
implementation that writes the same file, compared with them (`BaseLogits`): per token
KL(base ‖ this) = Σ p_base · (log p_base - log p), and whether both put the same token first.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

import numpy as np

from .. import __version__
from ..config import ModelConfig
from ..errors import ParameterError
from ..model import KVCache, forward_batch
from ..formats.safetensors_file import SafetensorsFile, SafetensorsWriter

DEFAULT_CTX = 512  # the context llama.cpp's published perplexities use


# ---------------------------------------------------------------------------------------------
# The method


def windows(ids: list[int], ctx: int, bos_id: Optional[int], chunks: Optional[int] = None) -> list[list[int]]:
    """The windows of `ctx` tokens that are scored (first token replaced by BOS if given)."""
    if ctx < 4:
        raise ParameterError("ctx", f"ctx must be at least 4, got {ctx}")
    if len(ids) < 2 * ctx:
        raise ParameterError("ctx", f"a context of {ctx} needs at least {2 * ctx} tokens of text (two "
                                    f"windows) and the text has {len(ids)}: give a longer text or a smaller context")
    n = len(ids) // ctx
    if chunks is not None:
        if chunks < 1:
            raise ParameterError("chunks", f"chunks must be >= 1, got {chunks}")
        n = min(n, chunks)
    out = [list(ids[i * ctx:(i + 1) * ctx]) for i in range(n)]
    if bos_id is not None:
        for w in out:
            w[0] = bos_id
    return out


def first_scored(ctx: int) -> int:
    """Position of the first logits row that is scored (it predicts the token after it)."""
    return ctx // 2


def scored_logits(weights: Mapping[str, np.ndarray], config: ModelConfig, window: list[int], batch: int,
                  on_batch: Optional[Callable[[int], None]] = None, compute="float32") -> np.ndarray:
    # [ctx] -> [ctx - 1 - ctx/2, V]
    """Logits at positions ctx/2 .. ctx-2 of one window run from an empty cache, `batch` tokens
    per forward call, in compute mode `compute`."""
    ctx, first = len(window), first_scored(len(window))
    cache = KVCache(config, ctx, compute)
    rows = []
    for start in range(0, ctx, batch):
        part = window[start:start + batch]
        lo, hi = max(first, start), min(start + len(part), ctx - 1)
        scored = slice(lo - start, hi - start) if lo < hi else slice(-1, None)  # the output product: these rows
        logits, = forward_batch(weights, config, [part], [cache], logits_rows=[scored])
        if lo < hi:
            rows.append(logits)
        if on_batch is not None:
            on_batch(start + len(part))
    return np.concatenate(rows)


def windows_per_pass(ctx: int, batch: int) -> int:
    """How many windows one forward pass runs: batch // ctx when `batch` holds whole windows, else 1
    (the window then goes in calls of `batch` tokens). llama-perplexity's n_seq, with its rule that
    a batch of more than a window holds whole windows. Raises ParameterError("batch")."""
    if batch < 1:
        raise ParameterError("batch", f"batch must be >= 1, got {batch}")
    if batch > ctx and batch % ctx:
        raise ParameterError("batch", f"a batch of more than one window holds whole windows: a multiple of the "
                                      f"context {ctx}, got {batch}")
    return max(1, batch // ctx)


def windows_logits(weights: Mapping[str, np.ndarray], config: ModelConfig, wins: list[list[int]], batch: int,
                   on_progress: Optional[Callable[[int, int], None]] = None,
                   compute="float32") -> Iterator[np.ndarray]:
    # n x [ctx] -> n x [ctx - 1 - ctx/2, V]
    """The scored logits of each window (`scored_logits`), in order: `windows_per_pass` windows in
    each `forward_batch`, or one window in calls of `batch` tokens. on_progress(window, tokens
    done in it) reports as it goes."""
    per_pass = windows_per_pass(len(wins[0]), batch)
    if per_pass == 1:
        for i, window in enumerate(wins):
            report = (lambda done, i=i: on_progress(i, done)) if on_progress else None
            yield scored_logits(weights, config, window, batch, report, compute)
        return
    ctx, first = len(wins[0]), first_scored(len(wins[0]))
    for start in range(0, len(wins), per_pass):
        group = wins[start:start + per_pass]
        caches = [KVCache(config, ctx, compute) for _ in group]
        scored = [slice(first, ctx - 1)] * len(group)  # the output product only for the rows scored
        for i, logits in enumerate(forward_batch(weights, config, group, caches, logits_rows=scored), start):
            if on_progress is not None:  # logits: [ctx - 1 - first, V]
                on_progress(i, ctx)
            yield logits


def log_softmax(logits: np.ndarray) -> np.ndarray:  # [N, V] -> [N, V], float64
    z = np.asarray(logits, dtype=np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - (m + np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True)))


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:  # [N, V], [N] -> [N]
    """-log p(target) under softmax(logits), per row."""
    return -log_softmax(logits)[np.arange(len(targets)), targets]


def kl_divergence(base_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:  # [N, V], [N, V] -> [N]
    """KL(base ‖ this) per row: Σ p_base · (log p_base - log p)."""
    log_base, log_this = log_softmax(base_logits), log_softmax(logits)
    return np.sum(np.exp(log_base) * (log_base - log_this), axis=-1)


@dataclass(frozen=True)
class Estimate:
    value: float
    error: float  # standard error


def mean_estimate(values: np.ndarray) -> Estimate:
    """Mean and standard error, computed as llama.cpp does: sqrt((mean(x²) - mean²) / (N - 1))."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    var = float(np.mean(x * x)) - mean * mean
    return Estimate(mean, math.sqrt(var / (x.size - 1)) if var > 0 and x.size > 1 else 0.0)


def perplexity_estimate(nll: np.ndarray) -> Estimate:
    """exp(mean nll), with the standard error PPL · se(mean nll) (first-order, as llama.cpp)."""
    m = mean_estimate(nll)
    ppl = math.exp(m.value)
    return Estimate(ppl, ppl * m.error)


@dataclass
class Result:
    ctx: int
    window_tokens: list[int]  # the tokens of every window, as in the text (before BOS replacement)
    nll: list[np.ndarray] = field(default_factory=list)  # per window: -log p of each scored token
    kl: list[np.ndarray] = field(default_factory=list)  # per window, with a base
    same_top: list[np.ndarray] = field(default_factory=list)
    base_nll: list[np.ndarray] = field(default_factory=list)

    @property
    def scored(self) -> int:
        return sum(len(x) for x in self.nll)

    @property
    def ppl(self) -> Estimate:
        return perplexity_estimate(np.concatenate(self.nll))

    def to_json(self) -> dict:
        ppl = self.ppl
        out = {"ctx": self.ctx, "chunks": len(self.nll), "scored_tokens": self.scored,
               "ppl": ppl.value, "ppl_error": ppl.error,
               "running_ppl": [perplexity_estimate(np.concatenate(self.nll[:i + 1])).value
                               for i in range(len(self.nll))]}
        if self.kl:
            kl, top = mean_estimate(np.concatenate(self.kl)), mean_estimate(np.concatenate(self.same_top))
            base = perplexity_estimate(np.concatenate(self.base_nll))
            out["kl"] = {"mean": kl.value, "error": kl.error, "max": float(np.concatenate(self.kl).max()),
                         "same_top": top.value, "same_top_error": top.error,
                         "base_ppl": base.value, "base_ppl_error": base.error}
        return out


def run_perplexity(weights: Mapping[str, np.ndarray], config: ModelConfig, ids: list[int], ctx: int,
                   batch: Optional[int] = None, bos_id: Optional[int] = None, chunks: Optional[int] = None,
                   save=None, base: Optional["BaseLogits"] = None,
                   on_progress: Optional[Callable[[int, int, int], None]] = None,
                   on_window: Optional[Callable[[Result], None]] = None, compute="float32",
                   kld=None) -> Result:
    """Score `ids` window by window (see the module docstring), in compute mode `compute`
    (`config.ComputeMode` or its name).

    save: receives each window's scored logits (`write`): a `LogitsWriter`, llama.cpp's base file
    (`kl_divergence.KLDBaseWriter`) or a list of such writers. base: earlier logits of the same windows, for KL. kld: llama.cpp's
    KL-divergence statistics against a base file (`kl_divergence.KLDivergence`), given each window's
    scored logits and the tokens they predict (`add_window`).
    on_progress(window, tokens done in it, ctx) and on_window(result so far) report as it goes.
    """
    batch = ctx if batch is None else batch
    windows_per_pass(ctx, batch)
    writers = list(save) if isinstance(save, (list, tuple)) else [] if save is None else [save]
    wins = windows(ids, ctx, bos_id, chunks)
    result = Result(ctx, list(ids[:len(wins) * ctx]))
    first = first_scored(ctx)
    report = (lambda i, done: on_progress(i, done, ctx)) if on_progress else None
    for i, logits in enumerate(windows_logits(weights, config, wins, batch, report, compute)):
        # logits: [ctx - 1 - first, V]
        targets = np.asarray(ids[i * ctx + first + 1:(i + 1) * ctx])
        result.nll.append(token_nll(logits, targets))
        for writer in writers:
            writer.write(logits)
        if kld is not None:
            kld.add_window(i, logits, targets)
        if base is not None:
            ref = base.window(i)
            result.kl.append(kl_divergence(ref, logits))
            result.same_top.append((np.argmax(ref, axis=-1) == np.argmax(logits, axis=-1)).astype(np.float64))
            result.base_nll.append(token_nll(ref, targets))
        if on_window is not None:
            on_window(result)
    return result


# ---------------------------------------------------------------------------------------------
# Saved logits: a safetensors file with one float32 tensor `logits` [N, V], rows in window order,
# and metadata: tokens (JSON list of the windows' tokens), ctx, producer.


def logits_metadata(window_tokens: list[int], ctx: int) -> dict[str, str]:
    return {"tokens": json.dumps(window_tokens), "ctx": str(ctx), "producer": f"llama3_np {__version__}"}


class LogitsWriter(SafetensorsWriter):
    """Writes the scored logits window by window, never holding them all in memory."""

    def __init__(self, path, n_rows: int, vocab_size: int, metadata: dict[str, str]):
        super().__init__(path, {"logits": (np.dtype("<f4"), (n_rows, vocab_size))}, metadata)

    def write(self, logits: np.ndarray) -> None:
        super().write(np.asarray(logits, dtype="<f4"))


class BaseLogits:
    """Logits saved by an earlier run, checked to be of the same windows."""

    def __init__(self, path, window_tokens: list[int], ctx: int, vocab_size: int):
        path = Path(path)
        if not path.is_file():
            raise ParameterError("kl_base", f"{path} does not exist: pass a file of saved logits")
        f = SafetensorsFile(path)
        per_window = ctx - 1 - first_scored(ctx)
        n_rows = len(window_tokens) // ctx * per_window
        if "logits" not in f.entries or f.dtype("logits") != np.dtype("<f4"):
            raise ParameterError("kl_base", f"{path}: no float32 tensor 'logits'; pass a file of saved logits")
        try:
            saved_tokens = json.loads(f.metadata.get("tokens", "null"))
            saved_ctx = int(f.metadata.get("ctx", "0"))
        except ValueError:
            raise ParameterError("kl_base", f"{path}: metadata 'tokens'/'ctx' are not readable") from None
        if saved_ctx != ctx or saved_tokens != window_tokens:
            raise ParameterError("kl_base", f"{path} holds logits of other windows (ctx {saved_ctx}, "
                                 f"{len(saved_tokens or [])} tokens) than this run (ctx {ctx}, {len(window_tokens)} "
                                 "tokens): use the same text, context size and number of windows")
        if f.shape("logits") != (n_rows, vocab_size):
            raise ParameterError("kl_base", f"{path}: logits have shape {list(f.shape('logits'))}, this run "
                                 f"scores [{n_rows}, {vocab_size}]: was it made with another model?")
        self.logits, self.per_window = f.tensor("logits"), per_window

    def window(self, i: int) -> np.ndarray:
        return self.logits[i * self.per_window:(i + 1) * self.per_window]


def report(result: Result) -> str:
    ppl = result.ppl
    lines = [f"Final estimate: PPL = {ppl.value:.4f} +/- {ppl.error:.5f} ({result.scored} tokens scored)"]
    kl = result.to_json().get("kl")
    if kl:
        lines += [f"KL divergence from the base logits: mean {kl['mean']:.4e} +/- {kl['error']:.4e}, "
                  f"max {kl['max']:.4e}",
                  f"same top-1 token: {100 * kl['same_top']:.3f} +/- {100 * kl['same_top_error']:.3f} %",
                  f"base PPL = {kl['base_ppl']:.4f} +/- {kl['base_ppl_error']:.5f}, "
                  f"ln(PPL / base PPL) = {math.log(ppl.value / kl['base_ppl']):.4e}"]
    return "\n".join(lines)
