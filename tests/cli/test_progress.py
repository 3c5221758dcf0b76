"""Long work shows progress on a terminal, through the command line's one progress line
(`cli.common.ProgressLine`): bench and import-gguf; a GGUF given to -m is read without an import."""

import io
import json

import llama3_np.cli.common
from llama3_np.formats import gguf_import
from llama3_np.formats.gguf_file import GGUFFile
from tests.cli.test_flags import run
from tests.test_files import tiny_gguf  # noqa: F401  (a fixture)
from tests.xcheck.test_bench import tiny_checkpoint  # noqa: F401  (a fixture)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def terminal(monkeypatch) -> Terminal:
    """stderr as a terminal, on which progress shows at once (as if each step took long); set in
    the test itself, after pytest's capture has taken stderr for the test's call."""
    monkeypatch.setattr(llama3_np.cli.common, "PROGRESS_AFTER_SECONDS", 0.0)
    stream = Terminal()
    monkeypatch.setattr("sys.stderr", stream)
    return stream


def lines_drawn(shown: str) -> list[str]:
    """The progress lines drawn in place, in order, and check the last was wiped."""
    drawn = [part.rstrip() for part in shown.split("\r")[1:-1] if part.strip()]
    assert shown.split("\r")[-2].strip() == "", "the progress line was not wiped"
    return drawn


def test_bench_shows_its_steps(tiny_checkpoint, capsys, monkeypatch):  # noqa: F811
    path, _, _ = tiny_checkpoint
    shown = terminal(monkeypatch)
    assert llama3_np.cli.main(["bench", "-m", str(path), "--prompt", "4", "--new", "2", "--runs", "2", "--json"]) == 0
    json.loads(capsys.readouterr().out)
    # the load, the warm-up, two runs, three limits, the bfloat16 conversions
    assert lines_drawn(shown.getvalue()) == [f"bench {i}/8 steps ({100 * i / 8:.0f}%)" for i in range(1, 9)]


def test_import_gguf_shows_the_tensors_read(tiny_gguf, capsys, monkeypatch, tmp_path):  # noqa: F811
    shown = terminal(monkeypatch)
    code, out, _ = run(capsys, "import-gguf", tiny_gguf, tmp_path / "out")
    assert code == 0 and out.startswith("imported ")
    n = len([name for name in GGUFFile(tiny_gguf).tensors if name != gguf_import.ROPE_FREQS])  # the weights
    assert lines_drawn(shown.getvalue()) == [f"importing {i}/{n} tensors ({100 * i / n:.0f}%)"
                                                for i in range(1, n + 1)]


def test_a_gguf_given_to_m_is_read_without_an_import(tiny_gguf, capsys, tmp_path, monkeypatch):  # noqa: F811
    stderr = terminal(monkeypatch)
    monkeypatch.setenv("LLAMA3_NP_CACHE", str(tmp_path / "cache"))
    assert run(capsys, "generate", "-m", tiny_gguf, "-p", "hi", "-n", "1", "--temp", "0")[0] == 0
    assert "importing" not in stderr.getvalue()
    assert not (tmp_path / "cache").exists()
