"""`llama3-np chat` on a terminal, driven through a pseudo-terminal as a user would: the slash
commands, arrow-key history, a pasted paragraph as one turn, a small context that overflows and
the chat going on after dropping old turns, colours only on a terminal, and a newline on Ctrl-D."""

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama3_np.assets import default_model
from llama3_np.text.chat import encode_dialog
from llama3_np.repl import message_text, parse_command
from llama3_np.load import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|[\x01\x02]")


class Terminal:
    """A process on a pseudo-terminal, and everything it has written."""

    def __init__(self, *argv, env=None):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "llama3_np", *argv], stdin=slave, stdout=slave,
                                     stderr=slave, cwd=REPO, env=env, close_fds=True)
        os.close(slave)
        self.raw = b""

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def expect(self, pattern: bytes, timeout: float = 180) -> re.Match:
        """Wait until the text (colours removed) after what earlier calls matched has `pattern`."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.compile(pattern).search(self.text, self.pos)
            if match:
                self.pos = match.end()
                return match
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {pattern!r} in:\n{self.text[self.pos:].decode(errors='replace')}"
            ready, _, _ = select.select([self.master], [], [], remaining)
            if ready:
                try:
                    self.raw += os.read(self.master, 65536)
                except OSError:  # the process exited and the terminal closed
                    assert False, f"no {pattern!r}; the chat ended:\n{self.text.decode(errors='replace')}"

    pos = 0

    @property
    def text(self) -> bytes:
        return ANSI.sub(b"", self.raw)

    def close(self) -> int:
        code = self.proc.wait(timeout=60)
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                break
            if not chunk:
                break
            self.raw += chunk
        os.close(self.master)
        return code


PROMPT = rb"(?m)^> "


def prompt_tokens(term: Terminal) -> int:
    return int(term.expect(rb"prompt (\d+) tokens?, ").group(1))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_model())


def test_a_chat_on_a_terminal(tok):
    env = dict(os.environ, TERM="xterm", OPENBLAS_NUM_THREADS="1")
    env.pop("NO_COLOR", None)
    term = Terminal("chat", "--temp", "0", "-c", "100", "-n", "16", env=env)
    try:
        term.expect(rb"/help lists the commands")
        term.expect(PROMPT)

        term.send(b"/help\r")
        term.expect(rb"/reset +start a new conversation")
        term.expect(PROMPT)
        term.send(b"\x1b[A\r")  # up arrow: the last line again
        term.expect(rb"/reset +start a new conversation")
        term.expect(PROMPT)

        # Three lines pasted at once: one message, one answer, one statistics line.
        paste = "Name a color.\nName a fruit.\nName an animal."
        term.send(paste.replace("\n", "\r").encode() + b"\r")
        assert prompt_tokens(term) == len(encode_dialog(tok, [{"role": "user", "content": paste}]))
        term.expect(PROMPT)
        assert term.text.count(b"stop: ") == 1

        # A 100-token context: the second question leaves no room, the oldest turn is dropped and
        # the conversation goes on from the whole remaining dialog.
        term.send(b"What is the capital of France?\r")
        prompt_tokens(term)
        term.expect(PROMPT)
        term.send(b"And of Italy?\r")
        term.expect(rb"\(the context is full: dropped the oldest turn of the conversation\)")
        prompt_tokens(term)
        term.expect(PROMPT)
        assert b"Rome" in term.text and b"Paris" in term.text

        term.send(b"/system You are a pirate.\r")
        term.expect(rb"new conversation \(system prompt: You are a pirate\.\)")
        term.expect(PROMPT)
        pirate = len(encode_dialog(tok, [{"role": "system", "content": "You are a pirate."},
                                         {"role": "user", "content": "Hello"}]))
        term.send(b"Hello\r")
        assert prompt_tokens(term) == pirate
        term.expect(PROMPT)
        term.send(b"/reset\r")
        term.expect(rb"new conversation")
        term.expect(PROMPT)
        term.send(b"Hello\r")
        assert prompt_tokens(term) == pirate  # the same system prompt, nothing of the turns before
        term.expect(PROMPT)
        assert b"\x1b[36m" in term.raw and b"\x1b[1;32m" in term.raw  # the model's and the user's colours

        term.send(b"\x04")  # Ctrl-D
        assert term.close() == 0
        assert term.text.endswith(b"> \r\n"), term.raw[-40:]  # the cursor left the prompt line
    finally:
        if term.proc.poll() is None:
            term.proc.kill()


def test_no_colours_when_piped_or_with_no_color_and_a_bracketed_paste_is_one_message(tok):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    env.pop("NO_COLOR", None)
    piped = subprocess.run([sys.executable, "-m", "llama3_np", "chat", "--temp", "0", "-n", "4"], input=b"Hi\n",
                           capture_output=True, cwd=REPO, env=env, timeout=300)
    assert piped.returncode == 0 and b"\x1b[" not in piped.stdout + piped.stderr
    term = Terminal("chat", "--temp", "0", "-n", "4", env=dict(env, TERM="xterm", NO_COLOR="1"))
    try:
        term.expect(PROMPT)
        # A paste as a terminal sends it in bracketed-paste mode, then Enter: one message.
        term.send(b"\x1b[200~Hi\nthere\x1b[201~\r")
        assert prompt_tokens(term) == len(encode_dialog(tok, [{"role": "user", "content": "Hi\nthere"}]))
        term.expect(PROMPT)
        assert term.text.count(b"stop: ") == 1
        term.send(b"\x04")
        assert term.close() == 0
        assert b"\x1b[36m" not in term.raw and b"\x1b[1;32m" not in term.raw
    finally:
        if term.proc.poll() is None:
            term.proc.kill()


def test_commands_and_messages_are_told_apart():
    assert parse_command("hello") is None and parse_command("//etc/hosts is a file") is None
    assert message_text("//etc/hosts is a file") == "/etc/hosts is a file"
    c = parse_command("/system Be brief.  ")
    assert (c.name, c.text, c.known) == ("system", "Be brief.", True)
    assert parse_command("/bogus x").known is False and parse_command("/quit").known is True


def test_a_message_too_long_for_the_context_is_not_sent_and_the_chat_goes_on():
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "llama3_np", "chat", "--temp", "0", "-c", "48", "-n", "4"],
                          input=("word " * 60 + "\nHi\n").encode(), capture_output=True, cwd=REPO, env=env,
                          timeout=300)
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert "not sent: this message takes " in err and "the context holds 48 (a shorter message, or a larger " \
        "--ctx-size)" in err
    assert err.count("stop: ") == 1  # the short message was answered


def test_an_n_limit_beyond_the_context_still_leaves_room_for_messages():
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "llama3_np", "chat", "--temp", "0", "-c", "64", "-n", "500"],
                          input=b"Hi\n", capture_output=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0 and done.stderr.decode().count("stop: ") == 1, done.stderr.decode()
