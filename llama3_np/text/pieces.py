"""How text became tokens, made readable: each token's id and the text piece it stands for.

A byte-level BPE token is a run of bytes, not always whole characters: a character of several
UTF-8 bytes may be split across tokens. `readable` shows such partial bytes as `\\xNN` escapes;
the pieces' bytes concatenate to the text's UTF-8 (special tokens show their name, and a byte the
vocabulary lacks is dropped by `Tokenizer.encode`, as the reference tokenizer drops it).
"""

from __future__ import annotations

from dataclasses import dataclass

from .tokenizer import Tokenizer


@dataclass(frozen=True)
class Piece:
    id: int
    bytes: bytes
    special: bool

    @property
    def readable(self) -> str:
        """The piece as text; bytes that are not whole UTF-8 characters as \\xNN escapes."""
        return self.bytes.decode("utf-8", errors="backslashreplace")

    def to_json(self) -> dict:
        return {"id": self.id, "piece": self.readable, "bytes": self.bytes.hex(), "special": self.special}


def pieces(tok: Tokenizer, ids: list[int]) -> list[Piece]:
    return [Piece(int(i), tok.token_bytes(i), i in tok.special_ids) for i in ids]


def format_pieces(items: list[Piece]) -> str:
    """One line per token, as llama.cpp's llama-tokenize prints them: `   504 -> 'The'`."""
    return "\n".join(f"{p.id:>6} -> {quoted(p.readable)}" for p in items)


def quoted(text: str) -> str:
    """'text' with control characters (newlines, tabs) escaped, so that one token is one line."""
    escaped = "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii")
                      for c in text)
    return f"'{escaped}'"
