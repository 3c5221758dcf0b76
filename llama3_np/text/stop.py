"""Stop strings: text that ends a generation once the generated text contains it (llama.cpp's
-r/--reverse-prompt, the OpenAI API's `stop`).

`StopStrings` is fed the generated text piece by piece, as it is decoded, and says what may be
shown so far. As the OpenAI API returns it, the text ends just before the first stop string,
which is not part of it, nor is anything after it; a stop string may span tokens. While the end
of the text could still be the start of a stop string, that end is held back (llama.cpp's server
does the same, `find_partial_stop_string`), so streamed pieces put together are exactly the text
a whole-text call returns. The text ends before the stop string that is complete first, reading
from the start (of two complete at the same character, the longer one), however the text is cut
into pieces; the generation ends at the first token after which a stop string is complete.

`StopText` puts a tokenizer's `StreamDecoder` in front: token ids in, text out.
"""

from __future__ import annotations

from typing import Iterable, Optional

from ..errors import ParameterError
from .tokenizer import StreamDecoder, Tokenizer


def check_stop_strings(stop: Iterable[str]) -> tuple[str, ...]:
    """`stop` (one string or several) as a tuple. Raises ParameterError (parameter "stop") for
    a stop string that is empty (it would match before any text) or not a string."""
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    for s in stop:
        if not isinstance(s, str) or s == "":
            raise ParameterError("stop", f"a stop string must be non-empty text, got {s!r}")
    return stop


class StopStrings:
    """Finds stop strings in a stream of text pieces. `push(piece)` returns the text that can be
    shown now; once a stop string is found, `found` is it and later pushes return "". `flush()`
    returns what is still held back, at the end of a generation no stop string ended."""

    def __init__(self, stop: Iterable[str]):
        self.stop = check_stop_strings(stop)
        self.found: Optional[str] = None
        self._held = ""  # the end of the text that could still begin a stop string

    def push(self, piece: str) -> str:
        if self.found is not None:
            return ""
        text = self._held + piece
        # (end, start) of each stop string's first occurrence
        hits = [(text.find(s) + len(s), text.find(s), s) for s in self.stop if s in text]
        if hits:
            _, start, self.found = min(hits)
            self._held = ""
            return text[:start]
        keep = max((_overlap(text, s) for s in self.stop), default=0)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def _overlap(text: str, stop: str) -> int:
    # the length of the longest end of `text` that begins `stop` (shorter than `stop`: a whole
    # one is found before this is asked)
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


class StopText:
    """Generated token ids to text, ending at stop strings: `push(id)` returns the text that can
    be shown now (whole UTF-8 characters, not the part that could begin a stop string), `flush()`
    the rest at the end; `found` is the stop string that ended the text (None while none has)."""

    def __init__(self, tokenizer: Tokenizer, stop: Iterable[str] = ()):
        self._decoder = StreamDecoder(tokenizer)
        self._stops = StopStrings(stop)

    @property
    def found(self) -> Optional[str]:
        return self._stops.found

    def push(self, token_id: int) -> str:
        return self._stops.push(self._decoder.push(token_id))

    def flush(self) -> str:
        text = self._stops.push(self._decoder.flush())
        return text if self.found is not None else text + self._stops.flush()
