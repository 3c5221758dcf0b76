"""llama.cpp's KL-divergence base files and the statistics `llama-perplexity --kl-divergence`
prints, so that a base written by llama3_np is read by llama.cpp and the other way round.

Source: llama.cpp's perplexity.cpp (vendor/llama.cpp/tools/perplexity/ of llama-cpp-python
0.3.36): the file is written by `perplexity()` with `--kl-divergence-base FILE` and read by
`kl_divergence()`; each row is made by the `log_softmax` overload that takes a `uint16_t *` and
read by the one that takes a `kl_divergence_result &`.

The file (all little-endian):

    "_logits_"                          8 bytes
    n_ctx                               uint32   the window size
    n_vocab, n_chunk                    int32    vocabulary size, number of windows
    tokens                              int32 [n_chunk · n_ctx]   the windows' tokens as in the text
                                                                  (before BOS replaces each first one)
    then per window, per scored position (ctx/2 .. ctx-2; `perplexity.first_scored`), one row of
    nv = 2·⌈n_vocab / 2⌉ + 4 uint16:
        scale, min_log_prob             float32, float32 (the first four uint16)
        q                               uint16 [n_vocab]: log p_i ≈ scale · q_i + min_log_prob
        (one uint16 of 0 when n_vocab is odd)

A row stores the log-probabilities of one position in 16 bits: with m the largest logit and
lo = max(smallest logit, m - 16), scale = (m - lo) / 65535, min_log_prob = lo - m - log Σ exp(z - m),
q_i = round((z_i - lo) / scale) for z_i > lo, else 0. Log-probabilities more than 16 below the top
one are therefore all stored as min_log_prob, and the reader leaves every token with a stored
log-probability of -16 or less out of the KL sum.

llama.cpp computes in float32 with float64 sums; the functions below do the same operations in the
same precision, vectorised over rows, so that the printed statistics agree to their printed digits
(the order of the float64 sums and the last bit of expf may differ; tests/xcheck/test_kl_divergence.py
measures by how much).
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import ParameterError
from ..files import AtomicFile
from .perplexity import first_scored

MAGIC = b"_logits_"
HEADER = struct.Struct("<8sIii")  # magic, n_ctx, n_vocab, n_chunk
CUTOFF = 16.0  # log-probabilities this far below the top one are not resolved (llama.cpp's `max_logit - 16`)
LEVELS = 65535.0  # the largest q
ROWS_AT_ONCE = 64  # rows converted together: bounds the float temporaries to a few [64, V] arrays
LINE_HEADER = ("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              "
               "Δp RMS            Same top p")


def row_width(n_vocab: int) -> int:
    """uint16 per row: the two float32 and n_vocab values, padded to an even count."""
    return 2 * ((n_vocab + 1) // 2) + 4


def rows_per_window(n_ctx: int) -> int:
    return n_ctx - 1 - first_scored(n_ctx)


def file_size(n_ctx: int, n_vocab: int, n_chunk: int) -> int:
    return HEADER.size + 4 * n_ctx * n_chunk + 2 * n_chunk * rows_per_window(n_ctx) * row_width(n_vocab)


# ---------------------------------------------------------------------------------------------
# One position's log-probabilities, as llama.cpp computes them


def _log_sum_exp(logits: np.ndarray, top: np.ndarray) -> np.ndarray:  # [N, V] f32, [N, 1] f32 -> [N, 1] f32
    """log Σ exp(z - top): each exp in float32 (expf), summed in float64, the log rounded to float32."""
    sum_exp = np.sum(np.exp(logits - top), axis=-1, keepdims=True, dtype=np.float64)
    return np.log(sum_exp).astype(np.float32)


def quantize_rows(logits: np.ndarray) -> np.ndarray:  # [N, V] -> [N, nv] uint16
    """The rows of a base file for `logits` (perplexity.cpp: log_softmax(n_vocab, logits, uint16_t *, tok))."""
    z = np.asarray(logits, dtype=np.float32)
    n, v = z.shape
    out = np.zeros((n, row_width(v)), dtype="<u2")
    for s in range(0, n, ROWS_AT_ONCE):
        x = z[s:s + ROWS_AT_ONCE]
        top = x.max(axis=-1, keepdims=True)                                      # [n, 1]
        lo = np.maximum(x.min(axis=-1, keepdims=True), top - np.float32(CUTOFF))  # [n, 1]
        min_log_prob = lo - top - _log_sum_exp(x, top)                            # [n, 1]
        scale = (top - lo) / np.float32(LEVELS)                                   # [n, 1]
        inv_scale = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale != 0)  # [n, 1]
        # nearest_int: round half to even; a value above 65535 would wrap in the uint16, as in C
        q = np.rint(inv_scale * (x - lo)).astype(np.int64)
        q = np.where(x > lo, q, 0).astype(np.uint16)
        out[s:s + len(x), :4] = np.concatenate([scale, min_log_prob], axis=1).astype("<f4").view("<u2")
        out[s:s + len(x), 4:4 + v] = q
    return out


def dequantize_rows(rows: np.ndarray, n_vocab: int) -> np.ndarray:  # [N, nv] uint16 -> [N, V] float32
    """Stored log-probabilities: scale · q + min_log_prob, in float32."""
    head = np.ascontiguousarray(rows[:, :4]).view("<f4")  # [N, 2]
    scale, min_log_prob = head[:, :1], head[:, 1:2]
    return scale * rows[:, 4:4 + n_vocab].astype(np.float32) + min_log_prob


@dataclass
class TokenStatistics:
    """Per scored token, as perplexity.cpp's reader computes them: -log p of the next token under
    this model (`nll`) and under the base (`nll_base`), KL(base ‖ this) over the tokens whose base
    log-probability exceeds -16 (`kld`), p - p_base of the next token (`p_diff`), and whether both
    rank the same token first (`same_top`)."""
    nll: np.ndarray       # [N] float32
    nll_base: np.ndarray  # [N] float32
    kld: np.ndarray       # [N] float64 (the percentiles take them as float32, as llama.cpp keeps them)
    p_diff: np.ndarray    # [N] float32
    same_top: np.ndarray  # [N] bool


def token_statistics(logits: np.ndarray, base_rows: np.ndarray, targets: np.ndarray) -> TokenStatistics:
    # [N, V] float32, [N, nv] uint16, [N] -> [N] each
    """(perplexity.cpp: log_softmax(n_vocab, logits, const uint16_t * base_log_prob, tok, kld))."""
    z = np.asarray(logits, dtype=np.float32)
    n, v = z.shape
    parts = []
    for s in range(0, n, ROWS_AT_ONCE):
        x, rows, tok = z[s:s + ROWS_AT_ONCE], base_rows[s:s + ROWS_AT_ONCE], targets[s:s + ROWS_AT_ONCE]
        at = np.arange(len(x))
        top = x.max(axis=-1, keepdims=True)                                  # [n, 1]
        log_norm = top + _log_sum_exp(x, top)                                # [n, 1]: max_logit += log_sum_exp
        nll = log_norm[:, 0] - x[at, tok]                                    # [n]
        log_p_base = dequantize_rows(rows, v)                                # [n, V]
        nll_base = -log_p_base[at, tok]
        resolved = log_p_base > np.float32(-CUTOFF)
        terms = np.exp(log_p_base) * (log_p_base - x + log_norm)            # [n, V] float32
        kld = np.sum(np.where(resolved, terms, np.float32(0)), axis=-1, dtype=np.float64)
        p_diff = np.exp(-nll) - np.exp(-nll_base)
        same_top = np.argmax(x, axis=-1) == np.argmax(log_p_base, axis=-1)   # first of equal maxima, as llama.cpp
        parts.append((nll, nll_base, kld, p_diff, same_top))
    return TokenStatistics(*(np.concatenate(column) for column in zip(*parts)))


# ---------------------------------------------------------------------------------------------
# The statistics llama-perplexity --kl-divergence prints


def mean_and_uncertainty(total: float, total2: float, count: int) -> tuple[float, float]:
    """Mean and its standard error as kl_divergence() computes them: 0 below 11 values."""
    if count < 1:
        return 0.0, 0.0
    f = total / count
    df = total2 / count - f * f
    return f, math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0


def covariance(a: float, b: float, ab: float, count: int) -> float:
    """Covariance of two means from the sums of a, b and a·b (0 below 10 values)."""
    if count < 10:
        return 0.0
    return (ab / count - (a / count) * (b / count)) / (count - 1)


def percentile(values: np.ndarray, fraction: float) -> np.float32:
    """Linear interpolation between sorted float32 values, in float32 as llama.cpp's lambda."""
    fraction = np.float32(fraction)
    if fraction <= 0:
        return values[0]
    if fraction >= 1:
        return values[-1]
    p = fraction * np.float32(len(values) - 1)
    i = int(p)
    p = p - np.float32(i)
    return (np.float32(1) - p) * values[i] + p * values[min(i + 1, len(values) - 1)]


def median(values: np.ndarray) -> np.float32:
    n = len(values)
    return np.float32(0.5) * (values[n // 2] + values[n // 2 - 1]) if n % 2 == 0 else values[n // 2]


@dataclass
class KLDivergence:
    """The running sums of `kl_divergence()` (its struct kl_divergence_result) against the base
    file `base`, and the per-token KLD and Δp values its percentiles are taken from."""
    base: "KLDBaseFile"
    sums: dict = field(default_factory=lambda: dict.fromkeys(
        ("nll", "nll2", "nll_base", "nll_base2", "nll_nll_base", "kld", "kld2", "p_diff", "p_diff2", "p_diff4"), 0.0))
    n_same_top: int = 0
    count: int = 0
    kld_values: list = field(default_factory=list)
    p_diff_values: list = field(default_factory=list)

    def add_window(self, i: int, logits: np.ndarray, targets: np.ndarray) -> None:
        """Window i's scored logits [rows, V] and the tokens they predict [rows], against the base's rows."""
        self.add(token_statistics(logits, self.base.window(i), targets))

    def add(self, t: TokenStatistics) -> None:
        nll, nll_base = t.nll.astype(np.float64), t.nll_base.astype(np.float64)
        kld, p_diff = t.kld, t.p_diff.astype(np.float64)
        s = self.sums
        s["nll"] += nll.sum()
        s["nll2"] += (t.nll * t.nll).astype(np.float64).sum()  # nll*nll: a float32 product
        s["nll_base"] += nll_base.sum()
        s["nll_base2"] += (t.nll_base * t.nll_base).astype(np.float64).sum()
        s["nll_nll_base"] += (t.nll * t.nll_base).astype(np.float64).sum()
        s["kld"] += kld.sum()
        s["kld2"] += (kld * kld).sum()
        s["p_diff"] += p_diff.sum()
        p_diff2 = (t.p_diff * t.p_diff).astype(np.float64)  # double p_diff2 = p_diff*p_diff (float product)
        s["p_diff2"] += p_diff2.sum()
        s["p_diff4"] += (p_diff2 * p_diff2).sum()
        self.n_same_top += int(t.same_top.sum())
        self.count += len(t.nll)
        self.kld_values.append(t.kld.astype(np.float32))
        self.p_diff_values.append(t.p_diff)

    def _mean(self, name: str, square: str) -> tuple[float, float]:
        return mean_and_uncertainty(self.sums[name], self.sums[square], self.count)

    def statistics(self) -> dict:
        """Every number llama-perplexity --kl-divergence prints, by the names of its report."""
        s, n = self.sums, self.count
        log_ppl, log_ppl_base = self._mean("nll", "nll2"), self._mean("nll_base", "nll_base2")
        cov = covariance(s["nll"], s["nll_base"], s["nll_nll_base"], n)
        ppl, ppl_base = math.exp(log_ppl[0]), math.exp(log_ppl_base[0])
        ratio = log_ppl[0] - log_ppl_base[0]
        ratio_unc = math.sqrt(max(log_ppl[1] ** 2 + log_ppl_base[1] ** 2 - 2 * cov, 0.0))
        ppl_unc, ppl_base_unc = ppl * log_ppl[1], ppl_base * log_ppl_base[1]
        mse = self._mean("p_diff2", "p_diff4")
        rms = math.sqrt(mse[0])
        same = self.n_same_top / n
        out = {
            "count": n,
            "ppl": (ppl, ppl_unc), "ppl_base": (ppl_base, ppl_base_unc),
            "ln_ppl_ratio": (ratio, ratio_unc),
            "cor_ln_ppl": cov / (log_ppl[1] * log_ppl_base[1]) if log_ppl[1] * log_ppl_base[1] else math.nan,
            "ppl_ratio": (math.exp(ratio), math.exp(ratio) * ratio_unc),
            "ppl_diff": (ppl - ppl_base, math.sqrt(max(ppl_unc ** 2 + ppl_base_unc ** 2
                                                       - 2 * ppl * ppl_base * cov, 0.0))),
            "kld": self._mean("kld", "kld2"),
            "p_diff": self._mean("p_diff", "p_diff2"),
            "p_diff_rms": (rms, 0.5 / rms * mse[1] if rms else 0.0),
            "same_top": (same, math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0),
        }
        kld = np.sort(np.concatenate(self.kld_values))
        p_diff = np.sort(np.concatenate(self.p_diff_values))
        out["kld_percentiles"] = {name: float(value) for name, value in _percentiles(kld, KLD_PERCENTILES)}
        out["p_diff_percentiles"] = {name: float(value) for name, value in _percentiles(p_diff, P_DIFF_PERCENTILES)}
        return out

    def chunk_line(self, chunk: int) -> str:
        """The line kl_divergence() prints after each window (running values)."""
        st = self.statistics()
        ppl, ratio, kld = st["ppl"], st["ln_ppl_ratio"], st["kld"]
        rms, same = st["p_diff_rms"], st["same_top"]
        return (f"{chunk:4d}    {ppl[0]:9.4f} ± {ppl[1]:9.4f}    {ratio[0]:10.5f} ± {ratio[1]:10.5f}"
                f"    {kld[0]:10.5f} ± {kld[1]:10.5f}    {100 * rms[0]:6.3f} ± {100 * rms[1]:6.3f} %"
                f"    {100 * same[0]:6.3f} ± {100 * same[1]:6.3f} %")


# (label, fraction): None is the median, 0 the minimum, 1 the maximum
KLD_PERCENTILES = [("Maximum", 1.0), ("99.9%", 0.999), ("99.0%", 0.990), ("95.0%", 0.950), ("90.0%", 0.900),
                   ("Median", None), ("10.0%", 0.100), (" 5.0%", 0.050), (" 1.0%", 0.010), (" 0.1%", 0.001),
                   ("Minimum", 0.0)]
P_DIFF_PERCENTILES = KLD_PERCENTILES[:5] + [("75.0%", 0.750), ("Median", None), ("25.0%", 0.250)] + KLD_PERCENTILES[6:]


def _percentiles(values: np.ndarray, table):
    for name, fraction in table:
        yield name, median(values) if fraction is None else percentile(values, fraction)


def report(st: dict) -> str:
    """The three summary blocks of llama-perplexity --kl-divergence, line for line."""
    def pm(key, fmt="10.6f"):
        return f"{st[key][0]:{fmt}} ± {st[key][1]:{fmt}}"
    lines = ["====== Perplexity statistics ======",
             f"Mean PPL(Q)                   : {pm('ppl')}",
             f"Mean PPL(base)                : {pm('ppl_base')}",
             f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * st['cor_ln_ppl']:6.2f}%",
             f"Mean ln(PPL(Q)/PPL(base))     : {pm('ln_ppl_ratio')}",
             f"Mean PPL(Q)/PPL(base)         : {pm('ppl_ratio')}",
             f"Mean PPL(Q)-PPL(base)         : {pm('ppl_diff')}",
             "",
             "====== KL divergence statistics ======",
             f"Mean    KLD: {pm('kld')}"]
    lines += [f"{name + ' ' * (8 - len(name))}KLD: {value:10.6f}" for name, value in st["kld_percentiles"].items()]
    lines += ["", "====== Token probability statistics ======",
              f"Mean    Δp: {100 * st['p_diff'][0]:6.3f} ± {100 * st['p_diff'][1]:5.3f} %"]
    lines += [f"{name + ' ' * (8 - len(name))}Δp: {100 * value:6.3f}%" for name, value in st["p_diff_percentiles"].items()]
    lines += [f"RMS Δp    : {100 * st['p_diff_rms'][0]:6.3f} ± {100 * st['p_diff_rms'][1]:5.3f} %",
              f"Same top p: {100 * st['same_top'][0]:6.3f} ± {100 * st['same_top'][1]:5.3f} %"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Files


class KLDBaseWriter:
    """Writes a base file window by window (`write`: the scored logits of one window), never
    holding them all; `close` renames it into place, `abort` leaves nothing (files.AtomicFile)."""

    def __init__(self, path, n_ctx: int, n_vocab: int, window_tokens: list[int]):
        n_chunk = len(window_tokens) // n_ctx
        if n_chunk * n_ctx != len(window_tokens):
            raise ValueError(f"{len(window_tokens)} window tokens are not whole windows of {n_ctx}")
        self.path, self.n_vocab, self.remaining = Path(path), n_vocab, n_chunk * rows_per_window(n_ctx)
        self.file = AtomicFile(self.path)
        self.file.write(HEADER.pack(MAGIC, n_ctx, n_vocab, n_chunk)
                        + np.asarray(window_tokens, dtype="<i4").tobytes())

    def write(self, logits: np.ndarray) -> None:  # [rows, V]
        self.remaining -= len(logits)
        self.file.write(quantize_rows(logits).tobytes())

    def close(self) -> None:
        if self.remaining != 0:
            self.file.discard()
            raise RuntimeError(f"{self.path}: {abs(self.remaining)} rows "
                               f"{'missing' if self.remaining > 0 else 'too many'}")
        self.file.commit()

    def abort(self) -> None:
        self.file.discard()


WRITTEN_BY = "llama-perplexity -f TEXT --kl-divergence-base FILE, or llama3-np perplexity the same way"


class KLDBaseFile:
    """A base file, checked whole before any window is run: the magic and a header whose sizes
    give exactly the file's length (here), a vocabulary and tokens of the model's
    (`check_vocabulary`), the windows of the text given (`check_tokens`). Rows are memory-mapped."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise self._refuse("does not exist: pass a file written by " + WRITTEN_BY)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(HEADER.size)
        if not head.startswith(MAGIC):
            raise self._refuse(f"is not a KL-divergence base file (it does not start with {MAGIC.decode()}): "
                               "pass one written by " + WRITTEN_BY)
        if len(head) < HEADER.size:
            raise self._refuse(f"is truncated ({size} bytes, its header alone takes {HEADER.size}): write it again")
        _, n_ctx, n_vocab, n_chunk = HEADER.unpack(head)
        if n_ctx < 4 or n_vocab < 1 or n_chunk < 1:
            raise self._refuse(f"has a damaged header (n_ctx {n_ctx}, n_vocab {n_vocab}, {n_chunk} chunks): "
                               "write it again")
        expected = file_size(n_ctx, n_vocab, n_chunk)
        if size != expected:
            state = "is truncated" if size < expected else "is longer than its header says"
            raise self._refuse(f"{state} ({size} bytes; n_ctx {n_ctx}, {n_chunk} chunks and a vocabulary of "
                               f"{n_vocab} take {expected}): write it again")
        self.n_ctx, self.n_vocab, self.n_chunk = n_ctx, n_vocab, n_chunk
        self.tokens = np.fromfile(self.path, dtype="<i4", count=n_ctx * n_chunk, offset=HEADER.size)
        bad = np.flatnonzero((self.tokens < 0) | (self.tokens >= n_vocab))
        if bad.size:
            raise self._refuse(f"holds token id {int(self.tokens[bad[0]])} at position {int(bad[0])}, outside its "
                               f"vocabulary of {n_vocab}: it is damaged; write it again")
        self.per_window = rows_per_window(n_ctx)
        self.rows = np.memmap(self.path, dtype="<u2", mode="r", offset=HEADER.size + 4 * n_ctx * n_chunk,
                              shape=(n_chunk * self.per_window, row_width(n_vocab)))

    def _refuse(self, what: str) -> ParameterError:
        return ParameterError("kl_divergence_base", f"{self.path} {what}")

    def check_vocabulary(self, vocab_size: int) -> None:
        """Refuse a file made with a model of another vocabulary."""
        if self.n_vocab != vocab_size:
            raise self._refuse(f"holds log-probabilities over a vocabulary of {self.n_vocab} tokens and this model "
                               f"has {vocab_size}: compare models with the same vocabulary")

    def check_tokens(self, window_tokens: list[int]) -> None:
        """Refuse a text whose windows are not the file's."""
        ours = np.asarray(window_tokens[:self.n_ctx * self.n_chunk], dtype=np.int64)
        if len(ours) != len(self.tokens) or not np.array_equal(ours, self.tokens):
            differ = np.flatnonzero(ours[:len(self.tokens)] != self.tokens[:len(ours)])
            at = int(differ[0]) if differ.size else min(len(ours), len(self.tokens))
            raise self._refuse(f"holds the windows of another text: its {len(self.tokens)} tokens differ from this "
                               f"text's from token {at} on; leave -f out to score the file's tokens, or pass the "
                               "text it was made from")

    def window(self, i: int) -> np.ndarray:  # -> [ctx - 1 - ctx/2, nv] uint16
        return np.asarray(self.rows[i * self.per_window:(i + 1) * self.per_window])
