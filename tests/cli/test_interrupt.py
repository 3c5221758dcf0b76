"""Ctrl-C (SIGINT) through the real command line: `generate` keeps what it printed and exits 130;
in `chat` it ends the current answer and the chat goes on. A reader that goes away (`| head -1`)
ends `generate` quietly, with its statistics, and exit status 141 (as SIGPIPE ends head's other writers)."""

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def start(*args) -> subprocess.Popen:
    # SIGINT back to its default in the child: a suite started in the background of a shell without
    # job control inherits SIGINT ignored, and Python then never turns Ctrl-C into KeyboardInterrupt.
    return subprocess.Popen([sys.executable, "-m", "llama3_np", *args], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def read_some(stream, want: int, timeout: float = 240) -> bytes:
    """Read from a pipe until `want` bytes arrived (or fail after `timeout` seconds)."""
    got, deadline = b"", time.monotonic() + timeout
    while len(got) < want:
        assert time.monotonic() < deadline, f"only {got!r} after {timeout} s"
        ready, _, _ = select.select([stream], [], [], 1)
        if ready:
            chunk = os.read(stream.fileno(), 4096)
            assert chunk, f"stream closed after {got!r}"
            got += chunk
    return got


def test_ctrl_c_in_generate_keeps_the_text_and_exits_130():
    proc = start("generate", "-p", "Once upon a time", "-n", "-1", "--temp", "0")
    first = read_some(proc.stdout, 20)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err, err.decode()
    assert "stop: interrupted" in err.decode()
    (first + rest).decode("utf-8")  # what was printed is kept, and is whole UTF-8


def test_ctrl_c_in_chat_ends_the_answer_and_the_chat_goes_on():
    proc = start("chat", "--temp", "0", "-n", "-1")
    proc.stdin.write(b"Write a long story about a dragon.\n")
    proc.stdin.flush()
    read_some(proc.stdout, 20)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(b"What is the capital of France?\n", timeout=240)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err
    stats = [line for line in err.decode().splitlines() if line.startswith("prompt ")]
    assert len(stats) == 2 and stats[0].endswith("stop: interrupted") and stats[1].endswith("stop: stop token"), err
    assert b"Paris" in out


def test_a_reader_that_goes_away_ends_generate_quietly_with_its_statistics():
    tiny = REPO / "tests" / "fixtures" / "kld" / "model_a.gguf"  # generates fast
    proc = start("generate", "-m", tiny, "-p", "Once upon a time", "-n", "100000", "--ignore-eos", "--temp", "0")
    read_some(proc.stdout, 1)
    proc.stdout.close()  # as head -c 1 does once it has its byte
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=240) == 141, err
    assert "Traceback" not in err and "Exception" not in err and "Broken pipe" not in err, err
    assert err.strip().splitlines()[-1].endswith("stop: output closed"), err
