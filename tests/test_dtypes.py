"""bfloat16 without paying for ml_dtypes where it is not needed (llama3_np/dtypes.py): importing
ml_dtypes 0.7.0 takes 1.6 to 1.9 s, so a command that never meets a bfloat16 tensor must not
import it. Timing is not tested (it depends on the machine); which modules a process imported is."""

import subprocess
import sys

import numpy as np

from llama3_np import __version__
from llama3_np.dtypes import bfloat16, is_bfloat16


def test_version_does_not_import_ml_dtypes():
    """`llama3-np --version` runs the command line's whole import path (the package, every
    command's module) and exits: ml_dtypes is not among the modules it imported."""
    script = ("import runpy, sys\n"
              "sys.argv = ['llama3-np', '--version']\n"
              "try:\n"
              "    runpy.run_module('llama3_np', run_name='__main__')\n"
              "except SystemExit as e:\n"
              "    print('exit', e.code)\n"
              "print('ml_dtypes imported:', 'ml_dtypes' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"llama3_np {__version__}", "exit 0", "ml_dtypes imported: False"], out.stdout


def test_bfloat16_is_ml_dtypes_and_is_told_apart_without_it():
    import ml_dtypes

    assert bfloat16() == np.dtype(ml_dtypes.bfloat16)
    assert is_bfloat16(bfloat16()) and is_bfloat16(np.zeros(2, bfloat16()).dtype)
    assert not any(is_bfloat16(np.dtype(d)) for d in ("<f4", "<f2", "<u2", "<i2", "V2"))
