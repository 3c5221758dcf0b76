"""The text a command reads: `-p TEXT`, or `-f FILE` (`-f -` for standard input, as llama.cpp).

A UTF-8 byte-order mark at the start of a file is dropped: editors on Windows write one, and it
would otherwise become three tokens in front of the prompt.
"""

from __future__ import annotations

import codecs
import sys
from pathlib import Path

from .errors import Llama3Error


def read_text_file(name: str, what: str = "prompt file") -> str:
    """The UTF-8 text of file `name` ("-": standard input) without a leading byte-order mark."""
    if name == "-":
        data = sys.stdin.buffer.read()
    else:
        path = Path(name)
        if not path.exists():
            raise Llama3Error(f"{what} {name} does not exist: pass -f the path of a UTF-8 text file "
                              "(or - for standard input)")
        if path.is_dir():
            raise Llama3Error(f"{what} {name} is a folder: pass -f the path of a UTF-8 text file")
        data = path.read_bytes()  # a regular file, or a pipe such as -f <(command)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Llama3Error(f"{what} {name} is not UTF-8 text (byte 0x{data[e.start]:02x} "
                          f"at offset {e.start}): convert it to UTF-8") from None
    return text[1:] if data.startswith(codecs.BOM_UTF8) else text


def read_prompt(args) -> str | None:
    """The text of -f (when given) or -p; None when neither was given."""
    if getattr(args, "file", None) is not None:
        return read_text_file(args.file)
    return getattr(args, "prompt", None)
