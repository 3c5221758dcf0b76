"""Test-session settings shared by every test module."""

import os
from pathlib import Path

# In a checkout the assets the tests read (the default model, the Llama 3 tokenizer) live in
# weights/, where `make test` fetches them (llama3_np/assets.py reads the variable on every call).
os.environ.setdefault("LLAMA3_NP_CACHE", str(Path(__file__).resolve().parents[1] / "weights"))

from hypothesis import settings

# Under CI (CI=true), property tests draw the same examples every run, so a run's verdict depends
# on the code alone; locally they keep exploring new examples (and replay saved failures).
settings.register_profile("ci", derandomize=True, database=None, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")



def _is_avx512(target: str) -> bool:
    return target == "X86_V4" or target.startswith("AVX512")


def _numpy_avx512_targets() -> dict[str, bool]:
    """NumPy's AVX-512 dispatch targets and whether each is in use."""
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    return {t: bool(__cpu_features__[t]) for t in __cpu_dispatch__ if _is_avx512(t)}


def pytest_report_header(config):
    import numpy as np
    on = [t for t, enabled in _numpy_avx512_targets().items() if enabled]
    disabled = os.environ.get("NPY_DISABLE_CPU_FEATURES")
    return (f"numpy {np.__version__} float32 kernels: {'AVX-512 (' + ' '.join(on) + ')' if on else 'AVX2 or older'}"
            + (f"; NPY_DISABLE_CPU_FEATURES={disabled!r}" if disabled else "")
            + (f"; OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']}" if os.environ.get("OPENBLAS_CORETYPE") else ""))


def pytest_configure(config):
    """A run that switches NumPy's AVX-512 kernels off (as `make test`'s second run does) must
    really run without them. NumPy silently ignores a name the CPU lacks and only warns (an
    ImportWarning, hidden by default) about a name it does not dispatch, so a misspelt, renamed
    or forgotten target would quietly rerun AVX-512 kernels."""
    names = os.environ.get("NPY_DISABLE_CPU_FEATURES", "").replace(",", " ").split()
    if not any(_is_avx512(name) for name in names):
        return
    from numpy._core._multiarray_umath import __cpu_dispatch__
    unknown = [name for name in names if name not in __cpu_dispatch__]
    left_on = [t for t, enabled in _numpy_avx512_targets().items() if enabled]
    if unknown or left_on:
        import pytest
        raise pytest.UsageError(
            f"NPY_DISABLE_CPU_FEATURES={' '.join(names)!r}: "
            + (f"NumPy dispatches no target {' '.join(unknown)}; " if unknown else "")
            + (f"{' '.join(left_on)} still on; " if left_on else "")
            + "name every AVX-512 target NumPy dispatches (numpy._core._multiarray_umath.__cpu_dispatch__)")
