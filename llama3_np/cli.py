"""The `llama3-np` command line (also `python -m llama3_np`).

Each subcommand lives in its own module, which exposes `add_command(subparsers)`: it adds its
parser and sets `func(args) -> int` as the parser default. This module only dispatches and turns
user errors into one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import Llama3Error
from .products import set_threads

# Modules under llama3_np/ that each add one or more subcommands, in the order --help lists them.
COMMAND_MODULES: list[str] = ["generate_cmd", "inspect_cmd", "dump_cmd", "compare", "trace_cmd", "perplexity", "bench"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag raises Llama3Error instead of printing usage and exiting."""

    def error(self, message):
        raise Llama3Error(f"{self.prog}: {message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llama3-np",
                     description="Llama 3 inference in plain NumPy: run, inspect and cross-check checkpoints.")
    parser.add_argument("--version", action="version", version=f"llama3_np {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}").add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "func", None) is None:
            raise Llama3Error("no command given (see 'llama3-np --help')")
        if getattr(args, "threads", None) is not None:  # -t/--threads, on every command that computes
            set_threads(args.threads)
        return args.func(args) or 0
    except Llama3Error as e:
        sys.stdout.flush()
        print(f"llama3-np: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`llama3-np generate ... | head`): nothing left to say.
        sys.stderr.close()
        return 1
