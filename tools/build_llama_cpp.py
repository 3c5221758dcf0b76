#!/usr/bin/env python3
"""Build one of llama.cpp's command-line tools (default: llama-perplexity) from the source that the
installed llama-cpp-python's sdist carries, so that the fixtures compare llama3_np with the very
llama.cpp that llama-cpp-python runs.

    python tools/build_llama_cpp.py [--target llama-perplexity] [--llama-cpp-source DIR]

The source is `vendor/llama.cpp` of the sdist (downloaded with pip unless --llama-cpp-source names
that folder). It is configured with cmake (Release, GGML_NATIVE=ON: the kernels of this CPU, as a
user's own build has them; static libraries, no OpenSSL, no tests, examples or server) into
build/llama.cpp/ (git-ignored) and only the target is built; a second run rebuilds only
what changed. It prints the path of the binary. Needs cmake, a C++ compiler and ninja or make;
building llama-perplexity takes about 10 minutes on two busy cores.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

from tool_support import REPO, run_tool  # first: it makes this checkout's llama3_np importable

from llama3_np.errors import Llama3Error  # noqa: E402

CMAKE_OPTIONS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_OPENSSL=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                 "-DLLAMA_BUILD_APP=OFF", "-DGGML_OPENMP=OFF"]


def llama_cpp_version() -> str:
    return version("llama-cpp-python")


def sdist_source() -> Path:
    """vendor/llama.cpp of the installed llama-cpp-python's sdist, downloaded and unpacked (once) in
    build/."""
    ver = llama_cpp_version()
    root = REPO / "build" / f"llama_cpp_python-{ver}-src"
    source = root / f"llama_cpp_python-{ver}" / "vendor" / "llama.cpp"
    if (source / "CMakeLists.txt").is_file():
        return source
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={ver}", "-d", tmp], check=True)
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(root, filter="data")
    return source


def build(target: str = "llama-perplexity", source: Path | None = None) -> Path:
    """The binary of `target`, built if it is missing or its source changed."""
    source = Path(source) if source is not None else sdist_source()
    if not (source / "CMakeLists.txt").is_file():
        raise Llama3Error(f"{source} is not llama.cpp's source folder (no CMakeLists.txt): pass --llama-cpp-source "
                          "the vendor/llama.cpp folder of llama-cpp-python's sdist")
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise Llama3Error(f"{tool} is not installed: install it (apt-get install cmake g++ ninja-build)")
    out = REPO / "build" / "llama.cpp"
    cache = out / "CMakeCache.txt"
    if cache.is_file() and f"CMAKE_HOME_DIRECTORY:INTERNAL={source.resolve()}\n" not in cache.read_text():
        shutil.rmtree(out)  # configured from another source
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    if not cache.is_file():
        subprocess.run(["cmake", "-S", str(source), "-B", str(out), *generator, *CMAKE_OPTIONS], check=True)
    subprocess.run(["cmake", "--build", str(out), "--target", target, "-j", "2"], check=True)
    binary = out / "bin" / target
    if not binary.is_file():
        raise Llama3Error(f"the build finished without {binary}")
    return binary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="llama-perplexity", help="the cmake target (default %(default)s)")
    p.add_argument("--llama-cpp-source", type=Path, metavar="DIR",
                   help="llama.cpp's source folder (default: vendor/llama.cpp of the installed llama-cpp-python's "
                        "sdist, downloaded with pip)")
    args = p.parse_args(argv)
    print(build(args.target, args.llama_cpp_source))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("build_llama_cpp", main, subprocess.CalledProcessError))
