"""llama3_np.files: a cache folder, an import-gguf OUT_DIR or an output file that cannot be written
ends in one line on stderr naming the path, why, and what to do (exit 2, no traceback), and leaves
nothing half-written.

The failures are real where this machine can make them: a path that runs through a regular file,
a cache that is a file, and a file larger than the process may write (RLIMIT_FSIZE, EFBIG, in a
subprocess). The tests run as root, whom permission bits do not stop, and cannot mount a read-only
file system: for EROFS the one system call that would fail (mkdir, or open of the file) is replaced
by one raising OSError(EROFS), as the kernel would.
"""

import errno
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from llama3_np.cli import main
from llama3_np.files import AtomicFile, WriteError, atomic_folder
from tests.checkpoint_builders import random_weights

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import make_checkpoint_fixtures as fixtures  # noqa: E402  (its GGUF writer needs only gguf)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    config = fixtures.fixture_config()
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    fixtures.write_gguf(path, config, random_weights(config), gguf.GGMLQuantizationType.F32, "llama-bpe")
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def read_only_below(monkeypatch, root: Path) -> None:
    """mkdir below `root` fails as on a read-only file system."""
    real = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).is_relative_to(root) and Path(path) != root:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)


# --- the cache ------------------------------------------------------------------------------------

@pytest.mark.parametrize("env", [
    {"LLAMA3_NP_CACHE": "{file}/cache"},   # under a regular file
    {"LLAMA3_NP_CACHE": "{file}"},         # the cache is a file
    {"LLAMA3_NP_CACHE": "", "XDG_CACHE_HOME": "{file}/xdg"},
])
def test_a_gguf_given_to_m_never_touches_even_a_cache_that_runs_through_a_file(
        capsys, monkeypatch, tmp_path, tiny_gguf, env):
    """A GGUF file is read where it is (formats.gguf_file): no cache folder is made or needed."""
    file = tmp_path / "file"
    file.write_text("x")
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(file=file))
    code, out, err = run(capsys, "tokenize", "-m", tiny_gguf, "-p", "hi")
    assert code == 0 and err == "", err
    assert files_under(tmp_path) == ["file"]


def test_a_read_only_cache_is_not_needed_for_a_gguf(capsys, monkeypatch, tmp_path, tiny_gguf):
    monkeypatch.setenv("LLAMA3_NP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    read_only_below(monkeypatch, tmp_path / "cache")
    code, out, err = run(capsys, "tokenize", "-m", tiny_gguf, "-p", "hi")
    assert code == 0 and err == "", err
    assert files_under(tmp_path) == ["cache"]


# --- import-gguf OUT_DIR --------------------------------------------------------------------------

def test_an_out_dir_that_cannot_be_written_is_one_line_and_leaves_nothing(capsys, monkeypatch, tmp_path, tiny_gguf):
    (tmp_path / "file").write_text("x")
    code, out, err = run(capsys, "import-gguf", tiny_gguf, tmp_path / "file" / "out")
    assert (code, out, err) == (2, "", f"llama3-np: error: cannot write {tmp_path}/file/out: {tmp_path}/file is a "
                                       "file, not a folder; name an OUT_DIR where you can write\n")
    read_only_below(monkeypatch, tmp_path / "ro")
    (tmp_path / "ro").mkdir()
    code, out, err = run(capsys, "import-gguf", tiny_gguf, tmp_path / "ro" / "out")
    assert (code, out, err) == (2, "", f"llama3-np: error: cannot write {tmp_path}/ro/out: the file system is "
                                       "read-only; name an OUT_DIR where you can write\n")
    assert files_under(tmp_path) == ["file", "ro"]


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of a signal


def test_a_write_that_fails_midway_leaves_no_folder_and_no_partial_file(tmp_path, tiny_gguf):
    """A real failure in the middle of model.safetensors (55 KB against a 20 KB file-size limit),
    after config.json was written: a full disk fails the same way."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "llama3_np", "import-gguf", str(tiny_gguf), str(out)],
                          capture_output=True, text=True, preexec_fn=_limit_file_size, cwd=REPO)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (f"llama3-np: error: cannot write {out}/model.safetensors: the file is larger than this "
                           "system allows; name an OUT_DIR where you can write\n")
    assert files_under(tmp_path) == []


# --- output files ---------------------------------------------------------------------------------

def test_an_output_file_on_a_read_only_folder_is_one_line(capsys, monkeypatch, tmp_path):
    parity = REPO / "tests" / "fixtures" / "parity" / "llama3_0"

    def read_only_open(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr("llama3_np.files.open", read_only_open, raising=False)
    code, out, err = run(capsys, "dump", "-m", parity, "--tokens", "1,2", "-o", tmp_path / "d.safetensors")
    assert (code, out, err) == (2, "", f"llama3-np: error: cannot write {tmp_path}/d.safetensors: the file system is "
                                       "read-only; choose a folder you can write\n")
    assert files_under(tmp_path) == []


# --- the helpers ------------------------------------------------------------------------------------

def test_atomic_file_and_folder_appear_complete_or_not_at_all(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with AtomicFile(tmp_path / "f.txt", "w") as f:
            f.write("half")
            raise KeyboardInterrupt
    assert files_under(tmp_path) == []
    with AtomicFile(tmp_path / "f.txt", "w") as f:
        f.write("whole")
    assert (tmp_path / "f.txt").read_text() == "whole"

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old").write_text("x")
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "d", replace=True) as tmp:
            (tmp / "new").write_text("y")
            raise RuntimeError
    assert files_under(tmp_path) == ["d", "d/old", "f.txt"]
    with atomic_folder(tmp_path / "d", replace=True) as tmp:
        (tmp / "new").write_text("y")
    assert files_under(tmp_path) == ["d", "d/new", "f.txt"]
    with pytest.raises(WriteError, match="it is a folder; name a file"):
        AtomicFile(tmp_path / "d")


def test_the_package_renames_files_into_place_in_one_module():
    """One atomic-write helper: no other module renames, replaces or makes temporary files itself."""
    pattern = re.compile(r"\bos\.(rename|replace)\(|\btempfile\.|\.partial\b")
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "llama3_np").rglob("*.py")
                 if p.name != "files.py" and pattern.search(p.read_text())]
    assert offenders == []


@pytest.mark.parametrize("content,expect,says", [
    (None, None, "settings.json: no such file"),
    (b'{"a": 1,\n "b": }', None, "settings.json: not valid JSON (line 2, column 7: Expecting value); download it again"),
    (b"\xff\xfe{}", None, "settings.json: not valid JSON (not UTF-8 text at byte 0); download it again"),
    (b"[1, 2]", dict, "settings.json: expected a JSON object, got list; download it again"),
])
def test_read_json_names_the_file_and_what_is_wrong(tmp_path, content, expect, says):
    """Every JSON file llama3_np reads (configs, tokenizer.json, adapter and trainer settings, tool
    definitions) goes through read_json: one sentence naming the file."""
    from llama3_np.errors import Llama3Error
    from llama3_np.files import read_json
    path = tmp_path / "settings.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(Llama3Error) as e:
        read_json(path, "trainer", "download it again", expect)
    assert str(e.value) == f"trainer {path.parent}/{says}"
    (tmp_path / "ok.json").write_text('{"x": [1]}')
    assert read_json(tmp_path / "ok.json", expect=dict) == {"x": [1]}


def test_no_module_reads_json_by_itself():
    """One JSON reader: json.load/json.loads on a file's text appear only in llama3_np.files (the
    others parse strings that are not files: safetensors headers, dump metadata, tool calls)."""
    offenders = []
    for path in (REPO / "llama3_np").rglob("*.py"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"json\.loads?\(.*(read_text|open\(|\bf\))", line) and path.name != "files.py":
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_a_folder_that_exists_but_refuses_new_files_is_not_called_missing(tmp_path):
    """Linux's /proc and /sys refuse to create a file with ENOENT, the errno of a missing folder."""
    from llama3_np.files import reason

    refused = OSError(errno.ENOENT, "No such file or directory")
    assert reason(refused, tmp_path / "out.txt") == f"folder {tmp_path} takes no new files"
    assert reason(refused, tmp_path / "gone" / "out.txt") == f"folder {tmp_path / 'gone'} does not exist"
