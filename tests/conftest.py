"""Test-session settings shared by every test module."""

import os

from hypothesis import settings

# Under CI (CI=true), property tests draw the same examples every run, so a run's verdict depends
# on the code alone; locally they keep exploring new examples (and replay saved failures).
settings.register_profile("ci", derandomize=True, database=None, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


def _numpy_avx512_targets():
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    return {t: __cpu_features__[t] for t in __cpu_dispatch__ if t == "X86_V4" or t.startswith("AVX512")}


def pytest_report_header(config):
    import numpy as np
    on = [t for t, enabled in _numpy_avx512_targets().items() if enabled]
    disabled = os.environ.get("NPY_DISABLE_CPU_FEATURES")
    return (f"numpy {np.__version__} float32 kernels: {'AVX-512 (' + ' '.join(on) + ')' if on else 'AVX2 or older'}"
            + (f"; NPY_DISABLE_CPU_FEATURES={disabled!r}" if disabled else ""))


def pytest_configure(config):
    """A run asked to go without AVX-512 must really do so. NumPy silently ignores a name the CPU
    lacks and only warns (an ImportWarning, hidden by default) about a name it does not dispatch,
    so a misspelt or renamed target would quietly rerun the AVX-512 kernels."""
    disabled = os.environ.get("NPY_DISABLE_CPU_FEATURES")
    if disabled is None:
        return
    from numpy._core._multiarray_umath import __cpu_dispatch__
    unknown = [name for name in disabled.replace(",", " ").split() if name not in __cpu_dispatch__]
    left_on = [t for t, enabled in _numpy_avx512_targets().items() if enabled]
    if unknown or left_on:
        import pytest
        raise pytest.UsageError(
            f"NPY_DISABLE_CPU_FEATURES={disabled!r}: " + (f"NumPy dispatches no target {' '.join(unknown)}; "
                                                          if unknown else "")
            + (f"{' '.join(left_on)} still on; " if left_on else "")
            + "name the AVX-512 targets NumPy dispatches (numpy._core._multiarray_umath.__cpu_dispatch__)")
