"""Reading JSON and writing files: every file and folder llama3_np writes appears complete or not
at all, and a file-system failure or a file that is not JSON is one sentence, not a traceback.

`read_json` reads a JSON file (a config, a tokenizer, an adapter's settings) and says which file is
missing, unreadable or not valid JSON, and where.

`AtomicFile` writes a file under a temporary name beside its path and renames it into place when it
is complete; `atomic_folder` does the same for a folder; `make_folder` creates a folder. Each turns
the OSError of a folder that cannot be created or written, a path that runs through a file, a full
disk or a read-only file system into a `WriteError` that names the path, says why in words and
what to do. A rename within one folder is atomic (POSIX rename(2)), so an interrupted write leaves
at most a hidden `.NAME.PID.partial` beside the target, never a target another run would take for
complete.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from .errors import Llama3Error

WRITE_ELSEWHERE = "choose a folder you can write"


class WriteError(Llama3Error):
    """A file or folder that cannot be written: `path`, why (`reason`, in words) and what to do
    (`advice`, which a caller that knows more can replace with `advise`)."""

    def __init__(self, path, reason: str, advice: str = WRITE_ELSEWHERE, what: str = ""):
        self.path, self.reason, self.advice, self.what = Path(path), reason, advice, what
        super().__init__(f"cannot write {what + ' ' if what else ''}{path}: {reason}; {advice}")

    def advise(self, advice: str, what: Optional[str] = None) -> "WriteError":
        """The same failure with other advice (and optionally a name for what was written)."""
        return WriteError(self.path, self.reason, advice, self.what if what is None else what)


def read_json(path, what: str = "", advice: str = "", expect: Optional[type] = None) -> Any:
    """The value of JSON file `path` (UTF-8). `what` names the file in errors ("tools file"),
    `advice` says what to do about a damaged one ("download it again"), `expect` (dict or list) the
    type the value must have.

    Raises Llama3Error, one sentence starting with the file: missing, a folder, unreadable, not
    UTF-8, not valid JSON (with the line and column of the first error) or not of type `expect`."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    tail = f"; {advice}" if advice else ""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Llama3Error(f"{label}: no such file") from None
    except IsADirectoryError:
        raise Llama3Error(f"{label}: a folder, not a JSON file") from None
    except UnicodeDecodeError as e:
        raise Llama3Error(f"{label}: not valid JSON (not UTF-8 text at byte {e.start}){tail}") from None
    except OSError as e:
        raise Llama3Error(f"{label}: cannot read ({e.strerror or e})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise Llama3Error(f"{label}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}){tail}") from None
    if expect is not None and not isinstance(value, expect):
        raise Llama3Error(f"{label}: expected a JSON {'object' if expect is dict else 'list'}, "
                          f"got {type(value).__name__}{tail}")
    return value


def _blocking_file(path: Path) -> Optional[Path]:
    """The nearest of `path` and its ancestors that exists and is not a folder (None if none)."""
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return None if p.is_dir() else p
    return None


def reason(e: OSError, path) -> str:
    """An OSError met while writing `path`, in words."""
    path = Path(path)
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = _blocking_file(path)
        if blocker is not None:
            return f"{blocker} is a file, not a folder"
    words = {errno.EROFS: "the file system is read-only", errno.ENOSPC: "no space left on the device",
             errno.EDQUOT: "the disk quota is used up", errno.EFBIG: "the file is larger than this system allows",
             errno.EACCES: "permission denied", errno.EPERM: "permission denied",
             errno.ENOENT: f"folder {path.parent} does not exist" if not path.parent.is_dir()
             else f"folder {path.parent} takes no new files"}  # /proc, /sys: they exist, and refuse with ENOENT
    return words.get(e.errno, e.strerror or str(e))


def write_error(e: OSError, path) -> WriteError:
    return WriteError(path, reason(e, path))


def make_folder(path) -> Path:
    """Create folder `path` and its parents (nothing if it exists). Raises WriteError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(e, path) from None
    return path


def check_can_write(path) -> None:
    """Refuse, before any work is done, a file that could not be created: it is a folder, or a
    folder on its way is missing or is a file. Raises WriteError."""
    path = Path(path)
    if path.is_dir():
        raise WriteError(path, "it is a folder", "name a file")
    if not path.parent.is_dir():
        blocker = _blocking_file(path.parent)
        raise WriteError(path, f"{blocker} is a file, not a folder" if blocker is not None
                         else f"folder {path.parent} does not exist")


def partial_name(path: Path) -> Path:
    """Where `path` is written until it is complete: a hidden name in the same folder (a rename
    across file systems would be a copy), unique to this process."""
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


class AtomicFile:
    """A file written under `partial_name(path)` and renamed over `path` by `commit` only when
    complete; `discard` (or an exception inside a `with` block) deletes it. Opened at once, so that
    a folder that cannot be written is refused before any work is done. Raises WriteError."""

    def __init__(self, path, mode: str = "wb"):
        self.path = Path(path)
        if self.path.is_dir():
            raise WriteError(self.path, "it is a folder", "name a file")
        self.partial = partial_name(self.path)
        try:
            self.file = open(self.partial, mode, **({} if "b" in mode else {"encoding": "utf-8"}))
        except OSError as e:
            raise write_error(e, self.path) from None

    def write(self, data) -> None:
        try:
            self.file.write(data)
        except OSError as e:
            self.discard()
            raise write_error(e, self.path) from None

    def commit(self) -> None:
        try:
            self.file.close()
            os.replace(self.partial, self.path)
        except OSError as e:
            self.discard()
            raise write_error(e, self.path) from None

    def discard(self) -> None:
        try:
            self.file.close()  # flushes what is buffered: fails again after a failed write
        except OSError:
            pass
        self.partial.unlink(missing_ok=True)

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()


def write_text(path, text: str) -> None:
    """Write a UTF-8 text file atomically. Raises WriteError."""
    with AtomicFile(path, "w") as f:
        f.write(text)


def write_bytes(path, data: bytes) -> None:
    """Write a file atomically. Raises WriteError."""
    with AtomicFile(path, "wb") as f:
        f.write(data)


@contextmanager
def atomic_folder(path, replace: bool = False) -> Iterator[Path]:
    """A new empty folder to fill, renamed to `path` when the `with` block ends without an error
    (replacing an existing `path` when `replace`), deleted otherwise. Raises WriteError."""
    path = Path(path)
    tmp = partial_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed process that had this id
        tmp.mkdir(mode=0o755)
    except OSError as e:
        raise write_error(e, path) from None
    try:
        try:
            yield tmp
        except WriteError as e:  # name the file as it will be, not its temporary folder
            if tmp not in e.path.parents:
                raise
            raise WriteError(path / e.path.relative_to(tmp), e.reason, e.advice, e.what) from None
        try:
            if replace and path.exists():
                old = tmp.with_name(tmp.name + ".old")
                os.rename(path, old)
                os.rename(tmp, path)
                shutil.rmtree(old)
            else:
                os.rename(tmp, path)
        except OSError as e:
            raise write_error(e, path) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
