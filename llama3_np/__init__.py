"""llama3_np: Meta's Llama 3 inference as plain NumPy functions.

The specification lives in `llama3_np.model`; everything else (checkpoint formats, the tokenizer,
sampling, the command line) feeds it arrays or consumes its logits.
"""

__version__ = "0.1.0"

from .errors import Llama3Error  # noqa: E402,F401
from .config import ModelConfig, RopeScaling  # noqa: E402,F401
