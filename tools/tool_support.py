"""What the tools/ scripts share: llama3_np importable from this checkout (tools run from a
checkout, not from an installed package), the checkout's weights/ as the asset cache (unless
LLAMA3_NP_CACHE names another), and user errors as one line on stderr with exit status 2."""

import os
import re
import statistics
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("LLAMA3_NP_CACHE", str(REPO / "weights"))

from llama3_np.cli.common import error_message  # noqa: E402
from llama3_np.errors import Llama3Error  # noqa: E402


def run_tool(tool: str, body: Callable[[], int | None], *errors: type[BaseException]) -> int:
    """body() with Llama3Error (and `errors`) turned into `tool: error: ...` and exit status 2."""
    try:
        return body() or 0
    except (Llama3Error, *errors) as e:
        # The tools' flags are the command line's, so a library parameter is named by its flag.
        print(f"{tool}: error: {error_message(e) if isinstance(e, Llama3Error) else e}", file=sys.stderr)
        return 2


def paired_ratio(a: list[dict], b: list[dict], key: str, b_key: str | None = None) -> float:
    """The median over rounds of a's figure `key` / b's figure `b_key` (default: `key`) of the same
    round: a ratio of runs taken close together, so that a drift of a shared machine's speed falls
    on both sides of each pair."""
    return statistics.median(x[key] / y[b_key or key] for x, y in zip(a, b))


def compact_number_lists(json_text: str) -> str:
    """JSON text with every list of numbers on one line (fixtures stay short and readable)."""
    return re.sub(r"\[[-\d.e,\s]+\]", lambda m: "[" + " ".join(m.group(0)[1:-1].split()) + "]", json_text)
