"""The one exception type for mistakes a user can make (bad flags, paths, files, prompts).

The command line turns a `Llama3Error` into one line on stderr and exit status 2. Anything else
that escapes is a bug in llama3_np and keeps its traceback.
"""

import sys


class Llama3Error(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""


class ParameterError(Llama3Error):
    """A bad value for a named parameter of the library (`temperature must be >= 0, got -1`).

    `parameter` is its Python name (`temperature`, `top_k`, `ctx`); the message speaks of it in
    the library's terms, and the command line, which knows the flag that sets it, puts the flag in
    front (`--temp: temperature must be >= 0, got -1`).
    """

    def __init__(self, parameter: str, message: str):
        super().__init__(message)
        self.parameter = parameter


def warn(message: str, kind: str = "warning") -> None:
    """One line on stderr about input llama3_np accepts but its user should know of
    (`llama3-np: warning: ...`, or `note` for a value it chose on the user's behalf)."""
    print(f"llama3-np: {kind}: {message}", file=sys.stderr, flush=True)
