"""The `llama3-np` command line (also `python -m llama3_np`).

Each command is a module of this package with `add_command(subparsers)`, which adds its parser and
sets `func(args) -> int` as the parser default. A command parses its flags, calls the library,
prints, and returns an exit status; this module only dispatches and turns a library error into one
line on stderr (exit status 2, naming the flag where the library names a parameter), Ctrl-C
into exit status 130 and a reader that went away (`| head -1`) into 141, quietly.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import Llama3Error
from . import (bench, chat, compare, dump, generate, import_gguf, inspect, perplexity, score, tokenize, trace,
               train, walkthrough)
from ..products import set_threads
from .common import EXIT_OUTPUT_CLOSED, error_message, refuse_llama_cpp_flags, silence_stdout

# The commands, in the order --help lists them.
COMMANDS = (generate, chat, inspect, dump, compare, trace, walkthrough, perplexity, score, bench, tokenize,
            import_gguf, train)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag raises Llama3Error instead of printing usage and exiting, and a
    long flag is taken only as spelled (no abbreviations: --n-pred is not --n-predict)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        raise Llama3Error(f"{self.prog}: {message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llama3-np",
                     description="Llama 3 inference in plain NumPy: run, inspect and cross-check checkpoints.")
    parser.add_argument("--version", action="version", version=f"llama3_np {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        command.add_command(sub)
    for command_parser in sub.choices.values():
        refuse_llama_cpp_flags(command_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args, unknown = build_parser().parse_known_args(argv)
        if unknown:
            # Flags that belong to no command's parser: point to the help of the command given.
            prog = "llama3-np" + (f" {args.command}" if args.command else "")
            raise Llama3Error(f"{prog}: unrecognized arguments: {' '.join(unknown)} (see '{prog} --help')")
        if getattr(args, "func", None) is None:
            raise Llama3Error("no command given (see 'llama3-np --help')")
        if getattr(args, "threads", None) is not None:  # -t/--threads, on every command that computes
            set_threads(args.threads)
        return args.func(args) or 0
    except Llama3Error as e:
        sys.stdout.flush()
        print(f"llama3-np: error: {error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`llama3-np tokenize ... | head`): nothing left to say to it.
        silence_stdout()
        return EXIT_OUTPUT_CLOSED
