"""The terminal side of `llama3-np chat`: reading a turn, the slash commands, and colours.

A turn is what the user sends in one go:
- on a terminal, Python's `readline` (where the platform has it) gives line editing and a history
  the arrow keys walk; a line ending in a backslash continues on the next line (as in llama.cpp),
  and several lines pasted at once are one turn (the lines already waiting when one is read, or
  the whole paste when readline's bracketed-paste mode hands it over as one line);
- from a pipe, each line is a turn (a trailing backslash still continues it).
A turn that starts with "/" is a command (`COMMANDS`); "//" sends a text that starts with "/".

Colours mark the user's and the model's text only when standard output is a terminal and the
`NO_COLOR` environment variable is unset or empty (no-color.org).
"""

from __future__ import annotations

import os
import select
import sys
from dataclasses import dataclass
from typing import Optional, TextIO

COMMANDS = {
    "/help": "show this help",
    "/reset": "start a new conversation with the same model and system prompt",
    "/system TEXT": "set the system prompt (no TEXT: the model's default) and start a new conversation",
    "/quit": "leave (as does Ctrl-D)",
}
HELP = "\n".join([f"  {name:<14} {what}" for name, what in COMMANDS.items()] + [
    "  end a line with \\ to continue on the next one; pasted lines are one message",
    "  start a message with // to send a text that begins with /",
    "  Ctrl-C stops an answer; the up and down arrows recall earlier lines",
])

# How long lines count as "already waiting" after one is read: a paste arrives at once, while
# nobody types Enter and the next key within this time.
PASTE_SECONDS = 0.02


@dataclass(frozen=True)
class Command:
    name: str  # "help", "reset", "system", "quit", or what the user typed after "/"
    text: str  # the rest of the line ("" when nothing follows)
    known: bool


def parse_command(turn: str) -> Optional[Command]:
    """The command a turn gives, or None when it is a message ("//..." is a message too)."""
    if not turn.startswith("/") or turn.startswith("//"):
        return None
    name, _, text = turn[1:].partition(" ")
    name = name.strip()
    known = any(c.split()[0] == f"/{name}" for c in COMMANDS)
    return Command(name, text.strip(), known)


def message_text(turn: str) -> str:
    """The text a message turn sends: "//x" sends "/x"."""
    return turn[1:] if turn.startswith("//") else turn


class Colors:
    """ANSI colours for the user's and the model's text, or nothing at all."""

    USER, MODEL, RESET = "\033[1;32m", "\033[36m", "\033[0m"

    def __init__(self, stream: TextIO, environ=os.environ):
        self.on = stream.isatty() and not environ.get("NO_COLOR") and environ.get("TERM") != "dumb"

    def prompt(self, text: str) -> str:
        """A readline prompt that switches to the user's colour; readline is told the escape
        takes no room (\\001 ... \\002), so that line editing keeps its columns."""
        return f"{text}\001{self.USER}\002" if self.on else text

    def code(self, which: str) -> str:
        return getattr(self, which) if self.on else ""


class TurnReader:
    """Reads one turn at a time from standard input (see the module docstring)."""

    def __init__(self, colors: Colors, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout):
        self.colors, self.stdin, self.stdout = colors, stdin, stdout
        self.interactive = stdin.isatty()
        if self.interactive:
            try:
                import readline  # noqa: F401  (importing it is what gives input() editing and history)
            except ImportError:  # Windows without pyreadline: plain input still works
                pass

    def _waiting(self) -> bool:
        """Whether more input is already there (the rest of a paste)."""
        try:
            ready, _, _ = select.select([self.stdin], [], [], PASTE_SECONDS)
        except (OSError, ValueError):
            return False
        return bool(ready)

    def _input(self, prompt: str) -> str:
        try:
            return input(self.colors.prompt(prompt) if self.interactive else "")
        finally:
            if self.colors.on:
                self.stdout.write(self.colors.RESET)
                self.stdout.flush()

    def read(self) -> Optional[str]:
        """The next turn (lines joined by newlines), None at the end of input (Ctrl-D)."""
        lines: list[str] = []
        prompt = "> "
        while True:
            try:
                line = self._input(prompt)
            except EOFError:
                if self.interactive:
                    self.stdout.write("\n")  # Ctrl-D leaves the cursor after the prompt
                    self.stdout.flush()
                return "\n".join(lines) if lines else None
            if line.endswith("\\"):
                lines.append(line[:-1])
                prompt = "... "
                continue
            lines.append(line)
            if self.interactive and self._waiting():
                prompt = ""  # a pasted line: no prompt between the lines of one message
                continue
            return "\n".join(lines)
