"""The assets the tokenizer tests read, and checks that they are the right ones.

The tokenizers come from the asset cache (`weights/` in a checkout: fetched by tools, git-ignored); the reference ids come from
`tests/fixtures/tokenizer/` (committed, written by `python tools/make_tokenizer_fixtures.py`).
A missing asset fails the tests that need it, with the command that fetches it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import pytest

from llama3_np.assets import cached_default_gguf, llama3_tokenizer_path
from llama3_np.load import load_tokenizer
from llama3_np.text.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "tokenizer"
LLAMA3_DIR = llama3_tokenizer_path().parent
DEFAULT_DIR = cached_default_gguf().parent  # holds the default model's GGUF, no tokenizer_config.json
LLAMA3_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"


def require(path: Path, command: str) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: run `{command}` (`make test` does)", pytrace=False)
    return path


@functools.cache
def llama3() -> Tokenizer:
    """Meta's Llama 3 tokenizer (`weights/llama3/tokenizer.model`)."""
    return load_tokenizer(require(LLAMA3_DIR / "tokenizer.model", "python tools/fetch_tokenizer.py").parent)


@functools.cache
def default() -> Tokenizer:
    """The default model's tokenizer, from its GGUF's metadata (`weights/default/*.gguf`)."""
    return load_tokenizer(require(cached_default_gguf(), "python tools/fetch_default_model.py"))


TOKENIZERS = {"llama3": llama3, "default": default}


@functools.cache
def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def corpus() -> list[str]:
    return fixture("corpus.json")["corpus"]


def long_text(case: dict) -> str:
    """A long input of the corpus: `unit` repeated and cut to `length` characters."""
    unit = case["unit"]
    return (unit * (case["length"] // len(unit) + 1))[:case["length"]]


def ids_sha256(ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


def first_difference(got: list[int], want: list[int]) -> str:
    at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return (f"{len(got)} ids vs {len(want)} expected; first difference at {at}: "
            f"got {got[at:at + 8]}, expected {want[at:at + 8]}")


def test_llama3_tokenizer_file_is_metas():
    path = require(LLAMA3_DIR / "tokenizer.model", "python tools/fetch_tokenizer.py")
    got = hashlib.sha256(path.read_bytes()).hexdigest()
    assert got == LLAMA3_SHA256, f"{path}: sha256 {got}, expected {LLAMA3_SHA256}"


def test_fixtures_describe_the_same_inputs():
    n = len(corpus())
    for name in ("llama3_reference.json", "default_reference.json"):
        ref = fixture(name)
        assert len(ref["corpus"]) == n, f"{name}: {len(ref['corpus'])} corpus entries, corpus.json has {n}"
        assert len(ref["long"]) == len(fixture("corpus.json")["long"]), name
        assert len(ref["dialogs"]) == len(fixture("corpus.json")["dialogs"]), name
