"""The weight products x · wᵀ of `model.linear`, on threads llama3_np owns.

`model.linear` is the equation; this module is how it is computed fast on a CPU, and nothing
here changes its value beyond the order of a sum:

- **Blocks of rows.** A weight [n_out, n_in] is cut into blocks of whole rows, and each block's
  product x · blockᵀ fills its own columns of the output. A bfloat16 (or float16) block is first
  converted into a float32 buffer the thread reuses for every block (the conversion is exact),
  then multiplied while it is still in the CPU cache: a model kept in bfloat16 reads 2 bytes per
  weight from memory and never holds, nor allocates per token, a float32 copy of a matrix. A block
  that is not the whole weight holds a multiple of `ROW_ALIGN` rows, so that a fused product (the
  weights of one input joined, `linear.linears`) gives each row the bits of its weight's own product.
- **Conversion.** bfloat16 is the high half of a float32, so a bit shift of its 16-bit patterns
  into the high half of 32-bit words is the exact conversion, as is ml_dtypes' cast; which of the
  two runs faster depends on the installed ml_dtypes (0.7.0's cast is several times slower than
  0.6.0's) and on the CPU, so the first bfloat16 product times both on one block and keeps the
  faster (`bfloat16_conversion`). A weight of another kind (quantized blocks) plugs in by the same
  hook: `rows_into(w)` is how rows start..stop of w become float32 in a thread's buffer.
- **Decode by halves.** A decode step (one token) is bound by the conversion, not by the
  product, so there a bfloat16 block is converted by halves (`halves_bfloat16`): each pair of
  neighbouring columns read as one 32-bit word gives the even column by one shift and the odd
  column by one mask, same-width operations that need no widening of 16-bit elements, into two
  contiguous float32 halves that stay in the core's cache (`HALVES_BLOCK_BYTES`); the row is then
  the product of its even half with x's even elements plus that of its odd half with x's odd
  elements. The values are the same exact conversion; only the order of each sum changes.
- **Threads.** `get_threads()` threads share the blocks of one product: the calling thread and
  `get_threads() - 1` workers of a pool, each taking the next block not yet taken until none is
  left. A thread slowed by another process on its core simply takes fewer blocks, so a busy
  machine slows a product in proportion to the CPU time it leaves, rather than making threads wait
  for each other. Products too small to pay for waking a worker run on the calling thread alone.
- **Several rows.** A product of a few rows (a batch's decode step, one row per sequence) is
  computed as (block · xᵀ)ᵀ: the same dot products as x · blockᵀ, for which OpenBLAS takes another
  sgemm path that costs about two thirds as much at 8 rows; at a prefill's hundreds of rows
  x · blockᵀ costs as much or less, and stays (`TRANSPOSED_MAX_ROWS`).
- **Batch invariance, on request.** BLAS chooses its kernel by the shape of a product: one row
  goes to a matrix-vector kernel, several to a matrix-matrix kernel that also sums in an order that
  depends on their number, so a row's result depends, in its last bits, on the rows beside it
  (a sequence's logits in a batch differ from its logits alone by float32 rounding).
  `set_batch_invariant(True)` computes every row by the matrix-vector kernel, on blocks of rows set
  by the weight's shape alone (neither the rows nor the threads): a row's result is then the same
  bits whatever the batch, at the cost of the matrix-matrix kernel's speed on several rows
  (thinking-machines-lab/batch_invariant_ops makes the same trade on GPUs).
- **BLAS on one thread.** NumPy's OpenBLAS would otherwise start threads of its own inside every
  block; two pools on the same cores wait on each other (OpenBLAS's threads spin while they wait,
  and collapse when another process holds a core). So the first product, or `set_threads`, holds
  OpenBLAS to one thread (`hold_blas_to_one_thread`).

What a Python user of llama3_np gets: `forward` and everything built on it compute on one thread
per core available to the process, unless `set_threads(n)` says otherwise; from llama3_np's first
product on, NumPy's OpenBLAS runs on one thread for the whole process, including the user's own
NumPy products (`blas_threads()` tells, `openblas_set_num_threads` through the same library
restores it). With a BLAS other than OpenBLAS, llama3_np cannot hold it and it may use threads of
its own: set its variable (MKL_NUM_THREADS=1, ...) before NumPy is imported.

The block sizes and the smallest product worth splitting were chosen from measurements on the
default model's and the Llama 3.2 1B shape's matrices (BENCHMARKS.md, "Threads and blocks").
"""

from __future__ import annotations

import ctypes
import itertools
import os
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .dtypes import is_bfloat16
from .errors import Llama3Error

# A bfloat16 block is converted into a float32 buffer of at most this many bytes: small enough that
# a buffer per thread stays in the last-level cache until it is multiplied, large enough that the
# Python work per block stays small beside the conversion.
CONVERT_BLOCK_BYTES = 4 << 20
# A float32 weight is multiplied in blocks of at most this many bytes: enough blocks per large
# product for the threads to share it unevenly when one of them is slowed, few enough to cost little.
FLOAT32_BLOCK_BYTES = 4 << 20
# Below this many multiply-adds (tokens × n_out × n_in), about 1 ms of work on one thread, a product
# runs on the calling thread alone: handing a block to a worker costs some 25 µs (its wake-up and
# the GIL), and splitting the default model's decode products (0.1 to 0.3 ms each) made whole
# decode steps no faster than one thread.
SPLIT_MIN_MACS = 1 << 22
# A block that is not a whole weight holds a multiple of this many rows (unless a block of so many
# would exceed its size in bytes): BLAS's matrix-vector kernels sum rows in groups of up to 16, the
# last rows of a block that is not a multiple of their group by other code, so aligned blocks give
# the rows of consecutive row blocks of one array (`linear.linears`' fused products) the bits their
# products alone give (measured, docs/DESIGN.md, "Fused products"), and cost nothing.
ROW_ALIGN = 16
# A decode step's bfloat16 block is converted by halves into a buffer of at most this many bytes,
# small enough to stay in the core's cache (L2) between the conversion and the products; 512 KiB
# made whole decode steps fastest among 128 KiB to 4 MiB (BENCHMARKS.md, "bfloat16 decode by halves").
HALVES_BLOCK_BYTES = 512 << 10
# Up to this many rows, a product of several rows is computed as (w · xᵀ)ᵀ rather than x · wᵀ: 1.2 to
# 1.7 times as fast at 8 rows on both models' shapes, as fast or faster from 2 to 32; from 64 rows on,
# the other sgemm path and the transposed copy of the output cost as much or more (BENCHMARKS.md,
# "Batches", tools/measure_batch_products.py). 0: always x · wᵀ.
TRANSPOSED_MAX_ROWS = 32
# Whether decode steps convert bfloat16 by halves (False: as prefills do, whole rows by
# `bfloat16_conversion`); for measuring one against the other (tools/measure_products.py).
DECODE_BY_HALVES = True


def conversion_rows(n_out: int, n_in: int) -> int:
    """How many rows of an [n_out, n_in] low-precision matrix one thread converts at a time."""
    return min(n_out, max(1, CONVERT_BLOCK_BYTES // (4 * n_in)))


def conversion_buffer_bytes(shapes, threads: Optional[int] = None) -> int:
    """The float32 bytes bfloat16 residency's conversion buffers grow to, for products with
    low-precision weights of these [n_out, n_in] shapes on `threads` threads (default: the current
    setting): each thread keeps the largest block it has converted, and a prefill splits every
    product over all threads."""
    threads = threads or _threads
    largest = max(block_rows(SPLIT_MIN_MACS, n_out, n_in, True, threads) * n_in * 4 for n_out, n_in in shapes)
    return threads * largest


def default_threads() -> int:
    """One thread per core this process may run on (its CPU affinity, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# OpenBLAS held to one thread


class _OpenBLAS:
    """The OpenBLAS that NumPy loaded, reached through ctypes, or None where it cannot be found.

    Why not OPENBLAS_NUM_THREADS: OpenBLAS reads it once, when NumPy is first imported, and a
    library is often imported after NumPy (a user's script, pytest, the `llama3-np` entry point,
    which imports the package and with it NumPy before any of its own code runs); an environment
    variable would also leak into every child process. Why not threadpoolctl: it would be a
    run-time dependency for two function calls.

    How: NumPy's wheels bundle OpenBLAS as a private library (scipy-openblas, in `numpy.libs/`)
    loaded without exporting its symbols, so it is found by file name among the libraries mapped
    into this process (/proc/self/maps on Linux; else in NumPy's bundled-library folders), opened
    again by path (which returns the handle already loaded), and its thread setter is called.
    The bundled build renames its symbols (`scipy_openblas_set_num_threads64_`); system builds
    keep `openblas_set_num_threads`. Every spelling is tried.
    """

    SPELLINGS = [(prefix, suffix) for prefix in ("", "scipy_") for suffix in ("", "64_", "_64")]

    def __init__(self, path: str, lib: ctypes.CDLL, set_threads, get_threads):
        self.path, self._lib, self._set, self._get = path, lib, set_threads, get_threads

    def set_threads(self, n: int) -> None:
        self._set(int(n))

    def get_threads(self) -> int:
        return int(self._get())

    @classmethod
    def find(cls) -> Optional["_OpenBLAS"]:
        for path in cls._candidate_paths():
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for prefix, suffix in cls.SPELLINGS:
                setter = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
                getter = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
                if setter is not None and getter is not None:
                    setter.argtypes, setter.restype = [ctypes.c_int], None
                    getter.argtypes, getter.restype = [], ctypes.c_int
                    return cls(path, lib, setter, getter)
        return None

    @staticmethod
    def _candidate_paths() -> list[str]:
        paths = []
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    path = line.split(maxsplit=5)[-1].strip()
                    if "openblas" in Path(path).name.lower() and path not in paths:
                        paths.append(path)
        except OSError:  # not Linux
            pass
        numpy_dir = Path(np.__file__).parent
        for folder in (numpy_dir.parent / "numpy.libs", numpy_dir / ".dylibs"):
            if folder.is_dir():
                paths += [str(p) for p in sorted(folder.iterdir()) if "openblas" in p.name.lower()]
        return paths


_openblas: Optional[_OpenBLAS] = None
_openblas_searched = False
_blas_held = False  # set by the first product, or by set_threads


def _find_openblas() -> Optional[_OpenBLAS]:
    global _openblas, _openblas_searched
    if not _openblas_searched:
        _openblas, _openblas_searched = _OpenBLAS.find(), True
    return _openblas


def hold_blas_to_one_thread() -> bool:
    """Set NumPy's OpenBLAS to one thread for the rest of the process (llama3_np's threads do
    the parallel work). True when it is held, False when no OpenBLAS was found."""
    global _blas_held
    _blas_held = True
    blas = _find_openblas()
    if blas is None:
        return False
    if blas.get_threads() != 1:
        blas.set_threads(1)
    return True


def blas_threads() -> Optional[int]:
    """The number of threads NumPy's OpenBLAS uses now, None when no OpenBLAS was found."""
    blas = _find_openblas()
    return None if blas is None else blas.get_threads()


# ---------------------------------------------------------------------------------------------
# The thread pool


class _Job:
    """`n` tasks `task(i)` shared by whichever threads call `run`, each taking the next index
    not yet taken; `wait` returns once every task taken has finished."""

    def __init__(self, task: Callable[[int], None], n: int):
        self.task, self.n = task, n
        self._taken = itertools.count()  # next() on a C iterator is atomic under the GIL
        self._finished = itertools.count(1)
        self._all_done = threading.Lock()
        self._all_done.acquire()  # released by the thread that finishes the last task
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        while (i := next(self._taken)) < self.n:
            try:
                self.task(i)
            except BaseException as e:  # handed to the caller, which re-raises it
                self.error = self.error or e
            if next(self._finished) == self.n:
                self._all_done.release()

    def wait(self) -> None:
        self._all_done.acquire()
        if self.error is not None:
            raise self.error


class ThreadPool:
    """The calling thread and `size - 1` daemon workers that sleep until a job arrives."""

    def __init__(self, size: int):
        self.size = size
        self._inboxes: list[queue.SimpleQueue] = []
        for k in range(1, size):
            inbox: queue.SimpleQueue = queue.SimpleQueue()
            threading.Thread(target=self._work, args=(inbox,), name=f"llama3_np-{k}", daemon=True).start()
            self._inboxes.append(inbox)

    @staticmethod
    def _work(inbox: queue.SimpleQueue) -> None:
        while (job := inbox.get()) is not None:
            job.run()

    def run(self, task: Callable[[int], None], n: int, threads: int) -> None:
        """task(0), ..., task(n - 1) on up to `threads` threads, the calling one included."""
        job = _Job(task, n)
        for inbox in self._inboxes[:threads - 1]:
            inbox.put(job)
        job.run()
        job.wait()

    def close(self) -> None:
        for inbox in self._inboxes:
            inbox.put(None)
        self._inboxes = []


_threads = default_threads()
_pool: Optional[ThreadPool] = None
_pool_lock = threading.Lock()


def set_threads(n: int) -> None:
    """Compute llama3_np's products on `n` threads (the calling one included) from now on, and
    hold NumPy's OpenBLAS to one thread. Raises Llama3Error when n < 1."""
    global _threads, _pool
    if int(n) != n or n < 1:
        raise Llama3Error(f"threads must be an integer >= 1, got {n}")
    with _pool_lock:
        _threads = int(n)
        if _pool is not None and _pool.size != _threads:
            _pool.close()
            _pool = None
    hold_blas_to_one_thread()


def get_threads() -> int:
    """How many threads llama3_np's products run on."""
    return _threads


def _get_pool() -> ThreadPool:
    global _pool
    with _pool_lock:
        if _pool is None or _pool.size != _threads:
            _pool = ThreadPool(_threads)
        return _pool


def parallel(task: Callable[[int], None], n: int, threads: Optional[int] = None) -> None:
    """task(0), ..., task(n - 1) on llama3_np's threads (at most `threads` of them): independent
    tasks (each writes its own output), in no particular order, all finished when this returns."""
    if not _blas_held:
        hold_blas_to_one_thread()
    threads = min(threads or _threads, _threads, n)
    if threads == 1:
        for i in range(n):
            task(i)
    else:
        _get_pool().run(task, n, threads)


# ---------------------------------------------------------------------------------------------
# Rows of a weight as float32

# rows_into(start, stop, out): write rows start..stop of a weight as float32 into `out`, a C-contiguous
# float32 [stop - start, n_in] buffer, exactly (the value each stored element stands for).
RowsInto = Callable[[int, int, np.ndarray], None]


def shift_bfloat16(src: np.ndarray, out: np.ndarray) -> None:
    """bfloat16 [r, n] -> float32 `out` [r, n]: each 16-bit pattern shifted into the high half of a
    32-bit word, the low half zero. Exact for every pattern, NaN payloads and subnormals included
    (bfloat16 is a float32 with its low 16 mantissa bits dropped)."""
    np.left_shift(src.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)


def cast(src: np.ndarray, out: np.ndarray) -> None:
    """float16 or bfloat16 [r, n] -> float32 `out` [r, n] through NumPy's cast (for bfloat16, the one
    ml_dtypes registers); exact, as float32 holds every value of either."""
    np.copyto(out, src)


# The exact bfloat16 -> float32 conversions, by the name `bench` prints.
BFLOAT16_CONVERSIONS: dict[str, Callable[[np.ndarray, np.ndarray], None]] = {
    "bit shift": shift_bfloat16,
    "ml_dtypes cast": cast,
}
# The trial that chooses one: each conversion this many times on a block of this many bfloat16
# bytes, interleaved, the fastest time of each compared (other processes only ever slow a run).
CONVERSION_TRIAL_BYTES, CONVERSION_TRIALS = 1 << 20, 5
_bfloat16_conversion: Optional[str] = None


def time_conversions(src: np.ndarray, out: np.ndarray, repeats: int) -> dict[str, float]:
    """The fastest of `repeats` interleaved runs of each bfloat16 conversion of `src` into `out`, in seconds."""
    best = {name: float("inf") for name in BFLOAT16_CONVERSIONS}
    for _ in range(repeats):
        for name, convert in BFLOAT16_CONVERSIONS.items():
            t0 = time.perf_counter()
            convert(src, out)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def bfloat16_conversion() -> str:
    """The name of the bfloat16 conversion products use: chosen on first call by timing each of
    `BFLOAT16_CONVERSIONS` on a block of CONVERSION_TRIAL_BYTES (about a millisecond in all), unless
    `set_bfloat16_conversion` named one. Both are exact, so the choice changes speed, never a value."""
    global _bfloat16_conversion
    if _bfloat16_conversion is None:
        from .dtypes import bfloat16

        n = CONVERSION_TRIAL_BYTES // 2
        src = (np.arange(n, dtype=np.uint32) * 2654435761 >> 16).astype(np.uint16).view(bfloat16())
        times = time_conversions(src, np.empty(n, dtype=np.float32), CONVERSION_TRIALS)
        _bfloat16_conversion = min(times, key=times.get)
    return _bfloat16_conversion


def set_bfloat16_conversion(name: Optional[str]) -> None:
    """Convert bfloat16 by `name` (a key of BFLOAT16_CONVERSIONS) from now on; None chooses again
    by timing at the next bfloat16 product. Raises Llama3Error for an unknown name."""
    global _bfloat16_conversion
    if name is not None and name not in BFLOAT16_CONVERSIONS:
        raise Llama3Error(f"bfloat16 conversion must be one of {', '.join(BFLOAT16_CONVERSIONS)}, got {name!r}")
    _bfloat16_conversion = name


def rows_into(w) -> Optional[RowsInto]:
    """How a weight's rows become float32 in a product's buffer; None for a float32 array, whose
    rows are multiplied where they are.

    bfloat16 by `bfloat16_conversion()`, float16 by NumPy's cast. A weight of a kind of its own
    (quantized blocks, say) is any object with `shape` (n_out, n_in) and a method
    `rows_into(start, stop, out)` that writes rows start..stop as float32 into `out` (`RowsInto`);
    products then convert it block by block into each thread's buffer like a bfloat16 weight.
    """
    if not isinstance(w, np.ndarray):
        return w.rows_into
    if w.dtype == np.float32:
        return None
    convert = BFLOAT16_CONVERSIONS[bfloat16_conversion()] if is_bfloat16(w.dtype) else cast

    def rows(start: int, stop: int, out: np.ndarray) -> None:
        convert(w[start:stop], out)

    return rows


# ---------------------------------------------------------------------------------------------
# The products

_buffers = threading.local()


def _conversion_buffer(size: int) -> np.ndarray:
    """This thread's float32 conversion buffer, of at least `size` elements, reused across calls
    (it grows to the largest block the thread has converted)."""
    buf = getattr(_buffers, "block", None)
    if buf is None or buf.size < size:
        buf = _buffers.block = np.empty(size, dtype=np.float32)
    return buf


def block_rows(T: int, n_out: int, n_in: int, low_precision: bool, threads: int, halves: bool = False) -> int:
    """Rows per block of an [n_out, n_in] weight multiplied by T tokens on `threads` threads
    (n_out when the product runs whole, on the calling thread); `halves`: converted by halves.
    Batch-invariant products: set by the shape alone, since a matrix-vector kernel's sums depend on
    where a block begins."""
    if _batch_invariant:
        rows = conversion_rows(n_out, n_in) if low_precision else max(1, FLOAT32_BLOCK_BYTES // (4 * n_in))
    elif halves:
        rows = max(1, HALVES_BLOCK_BYTES // (4 * n_in))
    elif low_precision:
        rows = conversion_rows(n_out, n_in)
    else:
        rows = n_out if threads == 1 else max(1, FLOAT32_BLOCK_BYTES // (4 * n_in))
    if threads > 1 and T * n_out * n_in >= SPLIT_MIN_MACS and not _batch_invariant:
        rows = min(rows, -(-n_out // threads))  # at least one block per thread
    if rows >= n_out:
        return n_out
    return rows - rows % ROW_ALIGN if rows > ROW_ALIGN else rows


_batch_invariant = False


def set_batch_invariant(on: bool) -> None:
    """From now on, compute every row of every product by the same kernel on the same blocks of
    rows, whatever the number of rows (on) or by the fastest kernel for the shape (off, the
    default): with it on, a sequence's logits in a batch (`model.forward_batch`) are bit for bit
    its logits alone (`model` computes each sequence's attention by itself)."""
    global _batch_invariant
    _batch_invariant = bool(on)


def batch_invariant() -> bool:
    """Whether products are batch-invariant (`set_batch_invariant`)."""
    return _batch_invariant


def halves_bfloat16(src: np.ndarray, even: np.ndarray, odd: np.ndarray) -> None:
    """bfloat16 [r, n] (n even, rows contiguous) -> float32 `even` [r, n/2], its even columns, and
    float32 `odd` [r, n/2], its odd columns, exactly (bits = bfloat16 bits << 16, as
    `shift_bfloat16`). Each pair of neighbours is one 32-bit word: on a little-endian machine its
    low half is the even column, which a shift by 16 makes a float32, and its high half the odd
    column, which clearing the low half makes one."""
    pairs = src.view(np.uint16).view(np.uint32)
    low, high = (even, odd) if np.little_endian else (odd, even)
    np.left_shift(pairs, np.uint32(16), out=low.view(np.uint32))
    np.bitwise_and(pairs, np.uint32(0xFFFF0000), out=high.view(np.uint32))


def _by_halves(x: np.ndarray, w) -> bool:
    """Whether x · wᵀ is a decode step's product with a bfloat16 weight that converts by halves (never
    when products are batch-invariant: a row alone and in a batch then sum in one order)."""
    return (DECODE_BY_HALVES and not _batch_invariant and x.shape[0] == 1 and isinstance(w, np.ndarray)
            and is_bfloat16(w.dtype) and w.shape[1] % 2 == 0 and w.flags.c_contiguous)


def _partial_buffer(size: int) -> np.ndarray:
    """This thread's float32 buffer for the even halves' products, of at least `size` elements."""
    buf = getattr(_buffers, "even_sums", None)
    if buf is None or buf.size < size:
        buf = _buffers.even_sums = np.empty(size, dtype=np.float32)
    return buf


def linear(x: np.ndarray, w) -> np.ndarray:  # [T, n_in], [n_out, n_in] -> [T, n_out]
    """x · wᵀ in float32 for a float32, bfloat16 or float16 weight w (or a weight of its own kind,
    `rows_into`), on llama3_np's threads.

    Equals float32 `x @ w.astype(np.float32).T` up to the order of each dot product's sum (the
    conversion is exact; the blocks split rows, and a decode step's bfloat16 product sums each
    row's even and odd columns apart, then adds the two). x must be float32.
    """
    T, n_in = x.shape
    n_out = w.shape[0]
    convert = rows_into(w)
    low_precision = convert is not None
    threads = _threads if T * n_out * n_in >= SPLIT_MIN_MACS else 1
    transposed = 1 < T <= TRANSPOSED_MAX_ROWS and not _batch_invariant
    if not low_precision and threads == 1 and not _batch_invariant:
        if not _blas_held:
            hold_blas_to_one_thread()
        return np.ascontiguousarray((w @ x.T).T) if transposed else x @ w.T
    halves = _by_halves(x, w)
    rows = block_rows(T, n_out, n_in, low_precision, threads, halves)
    out = np.empty((T, n_out), dtype=np.float32)
    if transposed:
        out_t = np.empty((n_out, T), dtype=np.float32)  # [n_out, T], rows of blocks contiguous
    if halves:
        half = n_in // 2
        x_even, x_odd = np.ascontiguousarray(x[0, 0::2]), np.ascontiguousarray(x[0, 1::2])

    def by_halves(start: int, stop: int) -> None:
        n = (stop - start) * half
        buffer = _conversion_buffer(2 * rows * half)
        even, odd = buffer[:n].reshape(-1, half), buffer[n:2 * n].reshape(-1, half)
        halves_bfloat16(w[start:stop], even, odd)
        partial, y = _partial_buffer(rows)[:stop - start], out[0, start:stop]
        np.dot(even, x_even, out=partial)
        np.dot(odd, x_odd, out=y)
        np.add(y, partial, out=y)

    def product(i: int) -> None:
        start = i * rows
        stop = min(start + rows, n_out)
        if halves:
            return by_halves(start, stop)
        if low_precision:
            block = _conversion_buffer(rows * n_in)[:(stop - start) * n_in].reshape(stop - start, n_in)
            convert(start, stop, block)
        else:
            block = w[start:stop]
        # np.dot lets other threads run during its BLAS call; np.matmul does only when the output
        # has more than 500 elements, as a prefill's does, never a decode step's blocks.
        if T == 1 or _batch_invariant:
            for t in range(T):  # the matrix-vector kernel, row by row
                np.dot(block, x[t], out=out[t, start:stop])
        elif transposed:
            np.matmul(block, x.T, out=out_t[start:stop])
        else:
            np.matmul(x, block.T, out=out[:, start:stop])

    parallel(product, -(-n_out // rows), threads)
    if transposed:
        np.copyto(out, out_t.T)
    return out
