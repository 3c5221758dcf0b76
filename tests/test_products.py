"""The weight products of `model.linear` (llama3_np/products.py): blocks of rows converted from
bfloat16 or float16 and shared by threads give float32 `x @ w.T` of the converted weight, up to the
order of each sum; the thread setting is honoured; NumPy's OpenBLAS is held to one thread.

The bound: a float32 dot product of n terms, summed in any order (FMA or not), differs from the
exact value by at most γ_n · Σ|x_k w_k| with γ_n = n·u / (1 - n·u), u = 2⁻²⁴ (Higham, Accuracy and
Stability of Numerical Algorithms, eq. 3.5). The bfloat16 → float32 conversion is exact, so the
converted product, and NumPy's own float32 product of the converted weight, must both lie within
it of the float64 product; only the summation order may differ between them.
"""

import os
import subprocess
import sys
import threading

import ml_dtypes
import numpy as np
import pytest

from llama3_np import model, products
from llama3_np.errors import Llama3Error

U = 2.0 ** -24


def dot_bound(x: np.ndarray, w: np.ndarray) -> np.ndarray:  # [T, n], [m, n] -> [T, m]
    n = x.shape[1]
    gamma = n * U / (1 - n * U)
    return gamma * (np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T)


def assert_within_dot_bound(got, x, w, name):
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    excess = np.abs(got - exact) - dot_bound(x, w)
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess[worst] <= 0, (f"{name}: |error| {abs(got - exact)[worst]:.3e} exceeds the bound "
                                f"{dot_bound(x, w)[worst]:.3e} at {worst}")


@pytest.fixture
def threads():
    """Set llama3_np's thread count for one test, then restore it."""
    before = products.get_threads()
    yield products.set_threads
    products.set_threads(before)


@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("split_min", [0, products.SPLIT_MIN_MACS])
@pytest.mark.parametrize("block_bytes", [4 * 301, 1 << 20])  # blocks of 1 row (n_in 300 or 301), whole
@pytest.mark.parametrize("T", [1, 5, products.TRANSPOSED_MAX_ROWS + 1])  # one row; several, (w · xᵀ)ᵀ; x · wᵀ
@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32])
@pytest.mark.parametrize("n_in", [300, 301])  # a decode step's bfloat16 product by halves; an odd width, by rows
def test_product_is_the_float32_product_of_the_converted_weight(monkeypatch, threads, n_threads, split_min,
                                                                 block_bytes, T, dtype, n_in):
    monkeypatch.setattr(products, "CONVERT_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(products, "HALVES_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(products, "FLOAT32_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(products, "SPLIT_MIN_MACS", split_min)
    threads(n_threads)
    halves = []
    monkeypatch.setattr(products, "halves_bfloat16", lambda *a: halves.append(a) or HALVES(*a))
    rng = np.random.default_rng(0)
    w = rng.normal(size=(67, n_in)).astype(dtype)
    x = rng.normal(size=(T, n_in)).astype(np.float32)
    w32 = w.astype(np.float32)
    assert np.array_equal(w32.astype(dtype).view(np.uint8), w.view(np.uint8)), "conversion is exact"
    got = products.linear(x, w)
    assert got.dtype == np.float32 and got.shape == (T, 67)
    assert_within_dot_bound(got, x, w32, f"{np.dtype(dtype).name} product on {n_threads} threads")
    assert_within_dot_bound(x @ w32.T, x, w32, "NumPy's float32 x @ w.T")
    assert np.array_equal(model.linear(x, w), got), "model.linear is products.linear"
    by_halves = T == 1 and dtype is ml_dtypes.bfloat16 and n_in % 2 == 0
    assert bool(halves) == by_halves, "a decode step's bfloat16 product converts by halves, others by rows"


HALVES = products.halves_bfloat16


@pytest.mark.parametrize("n_threads", [1, 2])
def test_a_batch_invariant_decode_product_is_a_row_of_the_batched_one(monkeypatch, threads, n_threads):
    """With batch-invariant products a decode step's bfloat16 product does not convert by halves,
    whose sums run in another order: a row alone is bit for bit that row in a batch."""
    threads(n_threads)
    rng = np.random.default_rng(4)
    w = rng.normal(size=(3000, 700)).astype(ml_dtypes.bfloat16)
    x = rng.normal(size=(4, 700)).astype(np.float32)
    monkeypatch.setattr(products, "halves_bfloat16", lambda *a: pytest.fail("converted by halves"))
    products.set_batch_invariant(True)
    try:
        batched = products.linear(x, w)
        assert all(np.array_equal(products.linear(x[t:t + 1], w)[0], batched[t]) for t in range(4))
    finally:
        products.set_batch_invariant(False)


def test_a_large_product_is_shared_by_every_thread(monkeypatch, threads):
    threads(3)
    calls = []
    real = products.parallel
    monkeypatch.setattr(products, "parallel", lambda task, n, t=None: calls.append((n, t)) or real(task, n, t))
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4096, 1024)).astype(ml_dtypes.bfloat16)
    x = rng.normal(size=(1, 1024)).astype(np.float32)
    assert 4096 * 1024 >= products.SPLIT_MIN_MACS
    assert_within_dot_bound(products.linear(x, w), x, w.astype(np.float32), "[4096, 1024] on 3 threads")
    (n_blocks, used), = calls
    assert used == 3 and n_blocks >= 3


@pytest.mark.parametrize("n_threads", [1, 2, 3, 4])
def test_parallel_runs_on_exactly_the_threads_set(threads, n_threads):
    """Each task waits until n_threads tasks run at once: with fewer threads the barrier breaks
    (after its timeout), and no more than n_threads distinct threads ever run a task."""
    threads(n_threads)
    barrier = threading.Barrier(n_threads, timeout=20)
    seen = set()

    def task(i):
        seen.add(threading.get_ident())
        barrier.wait()

    products.parallel(task, 3 * n_threads)
    assert len(seen) == n_threads and threading.get_ident() in seen


def test_every_task_runs_once_and_an_error_reaches_the_caller(threads):
    threads(3)
    done = np.zeros(100, dtype=np.int64)

    def task(i):
        done[i] += 1

    products.parallel(task, 100)
    assert (done == 1).all()

    def failing(i):
        if i == 57:
            raise ValueError("task 57 failed")

    with pytest.raises(ValueError, match="task 57 failed"):
        products.parallel(failing, 100)
    products.parallel(task, 100)  # the pool still works
    assert (done == 2).all()


def test_threads_must_be_at_least_one(threads):
    with pytest.raises(Llama3Error, match="threads must be an integer >= 1, got 0"):
        threads(0)


def test_openblas_is_held_to_one_thread_from_the_first_product():
    """In a fresh process whose OpenBLAS starts with 2 threads (OPENBLAS_NUM_THREADS, read when
    NumPy is imported; fewer on a 1-core machine), the first product leaves it at one."""
    if products.blas_threads() is None:
        pytest.skip("NumPy here does not use OpenBLAS: llama3_np cannot hold its threads")
    script = ("import numpy as np\n"
              "from llama3_np import model, products\n"
              "before = products.blas_threads()\n"
              "model.linear(np.ones((1, 8), np.float32), np.ones((8, 8), np.float32))\n"
              "print(before, products.blas_threads())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", script], env=dict(env, OPENBLAS_NUM_THREADS="2"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after = map(int, out.stdout.split())
    assert (before, after) == (min(2, os.cpu_count()), 1)


# --- the command line ----------------------------------------------------------------------------

COMPUTING_COMMANDS = ["generate", "chat", "dump", "trace", "walkthrough", "perplexity", "bench", "train",
                      "score", "compare", "adjudicate"]  # compare computes with --replay


def test_every_command_that_computes_takes_threads():
    from llama3_np.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.choices and "generate" in a.choices).choices
    takes = sorted(name for name, p in commands.items()
                   if any("--threads" in a.option_strings for a in p._actions))
    assert takes == sorted(COMPUTING_COMMANDS)
    assert commands["generate"].parse_args(["-t", "3", "--tokens", "1"]).threads == 3
    assert commands["generate"].parse_args(["--tokens", "1"]).threads == products.default_threads()


def test_generate_runs_on_the_threads_asked_and_says_so():
    from pathlib import Path

    parity = Path(__file__).parent / "fixtures" / "parity" / "llama3_1"
    out = subprocess.run([sys.executable, "-m", "llama3_np", "generate", "-m", str(parity), "--tokens", "5,17",
                          "-n", "3", "--temp", "0", "-t", "3"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "| 3 threads |" in out.stderr, out.stderr


# --- rows of a weight as float32 -----------------------------------------------------------------

ALL_BFLOAT16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(256, 256)


@pytest.mark.parametrize("name", list(products.BFLOAT16_CONVERSIONS))
def test_every_bfloat16_pattern_converts_exactly(name):
    """All 65,536 patterns (zeros, subnormals, normals, infinities, quiet and signalling NaNs with
    their payloads): float32 bits = bfloat16 bits << 16, the definition of bfloat16."""
    out = np.full((256, 256), np.nan, dtype=np.float32)
    products.BFLOAT16_CONVERSIONS[name](ALL_BFLOAT16.view(ml_dtypes.bfloat16), out)
    want = ALL_BFLOAT16.astype(np.uint32) << 16
    wrong = np.flatnonzero(out.view(np.uint32) != want)
    assert wrong.size == 0, (f"{name}: {wrong.size} patterns differ, first 0x{ALL_BFLOAT16.flat[wrong[0]]:04x} -> "
                             f"0x{out.view(np.uint32).flat[wrong[0]]:08x}")


def test_halves_convert_every_bfloat16_pattern_exactly():
    """Each pair of neighbouring columns as one 32-bit word: the even columns by a shift, the odd
    ones by a mask, every one of the 65,536 patterns to float32 bits = bfloat16 bits << 16, in an
    even column and in an odd one."""
    for patterns in (ALL_BFLOAT16, np.roll(ALL_BFLOAT16, 1, axis=1)):
        even, odd = (np.full((256, 128), np.nan, dtype=np.float32) for _ in range(2))
        products.halves_bfloat16(patterns.view(ml_dtypes.bfloat16), even, odd)
        want = patterns.astype(np.uint32) << 16
        assert np.array_equal(even.view(np.uint32), want[:, 0::2])
        assert np.array_equal(odd.view(np.uint32), want[:, 1::2])


@pytest.fixture
def conversion():
    """Name the bfloat16 conversion for one test, then let products choose again."""
    yield products.set_bfloat16_conversion
    products.set_bfloat16_conversion(None)


@pytest.mark.parametrize("name", list(products.BFLOAT16_CONVERSIONS))
def test_rows_into_converts_the_rows_asked_by_either_method(conversion, name):
    conversion(name)
    w = ALL_BFLOAT16.view(ml_dtypes.bfloat16)
    out = np.empty((7, 256), dtype=np.float32)
    products.rows_into(w)(100, 107, out)
    assert np.array_equal(out.view(np.uint32), ALL_BFLOAT16[100:107].astype(np.uint32) << 16)
    assert products.rows_into(np.zeros((2, 2), np.float32)) is None


def test_the_conversion_is_chosen_by_timing_and_either_gives_the_same_product(conversion, threads):
    conversion(None)
    assert products.bfloat16_conversion() in products.BFLOAT16_CONVERSIONS
    threads(2)
    rng = np.random.default_rng(2)
    w = rng.normal(size=(3000, 700)).astype(ml_dtypes.bfloat16)
    x = rng.normal(size=(3, 700)).astype(np.float32)
    got = {}
    for name in products.BFLOAT16_CONVERSIONS:
        conversion(name)
        got[name] = products.linear(x, w)
    first, *others = got.values()
    assert all(np.array_equal(first, o) for o in others), "both conversions are exact: same blocks, same bits"
    with pytest.raises(Llama3Error, match="bfloat16 conversion must be one of"):
        conversion("truncate")


class RowsOfItsOwn:
    """A weight of another kind (as quantized blocks would be): shape, and rows_into(start, stop, out)."""

    def __init__(self, values: np.ndarray):
        self.shape, self.values, self.calls = values.shape, values, []

    def rows_into(self, start, stop, out):
        self.calls.append((start, stop))
        out[...] = self.values[start:stop]


@pytest.mark.parametrize("n_threads", [1, 3])
def test_a_weight_of_its_own_kind_plugs_in_by_rows_into(monkeypatch, threads, n_threads):
    """Such a weight is converted block by block into the threads' buffers like bfloat16, and its
    product is the float32 product of the values it writes."""
    monkeypatch.setattr(products, "CONVERT_BLOCK_BYTES", 4 * 300 * 10)  # blocks of 10 rows
    monkeypatch.setattr(products, "SPLIT_MIN_MACS", 0)
    threads(n_threads)
    rng = np.random.default_rng(3)
    values = rng.normal(size=(67, 300)).astype(np.float32)
    w = RowsOfItsOwn(values)
    x = rng.normal(size=(2, 300)).astype(np.float32)
    assert_within_dot_bound(products.linear(x, w), x, values, "rows_into weight")
    assert sorted(w.calls) == [(s, min(s + 10, 67)) for s in range(0, 67, 10)]
