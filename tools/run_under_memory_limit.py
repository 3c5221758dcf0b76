#!/usr/bin/env python3
"""Generate from a checkpoint larger than the memory it is allowed: bfloat16 residency streams the
memory-mapped weights from disk.

    python tools/run_under_memory_limit.py [-m DIR] [--limit-gib G] [-n N] [-t N]

Default: the Llama 3.1 8B-shaped random checkpoint (`tools/make_random_checkpoint.py llama3.1-8b`,
16 GB of bf16) under a memory limit of 8 GiB. Needs root: the limit is a cgroup of its own, made
inside this process's memory cgroup (cgroup v2 `memory.max`, or v1 `memory.limit_in_bytes`) and
removed afterwards. The checkpoint's files are first dropped from the page cache
(posix_fadvise DONTNEED), so that the pages the run reads are charged to its cgroup rather than
found already cached; then `llama3-np generate --dtype bfloat16 --temp 0 -n N` runs inside the
cgroup. A page of weights read once per token is clean and file-backed, so when the cgroup is
full the kernel drops the least recently used ones and reads them again on the next token, and the
model runs at the speed of the disk instead of being killed.

Prints the limit, the cgroup's peak usage (its page cache included), the process's peak RSS, the
bytes it read from disk, the tokens generated and their rate. Exit status 1 when fewer than N
tokens came out (killed by the limit, or another failure).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from tool_support import REPO, run_tool  # first: it makes this checkout's llama3_np importable

from llama3_np.errors import Llama3Error
from llama3_np.products import default_threads

DEFAULT_MODEL = REPO / "weights" / "random-llama3.1-8b"
PROMPT = "1,2,3,4"


class MemoryCgroup:
    """A child of this process's memory cgroup with a hard limit, for one child process."""

    def __init__(self, limit_bytes: int):
        self.path, self.v2 = self._parent_path()
        self.path = self.path / f"llama3_np-limit-{os.getpid()}"
        try:
            self.path.mkdir()
        except OSError as e:
            raise Llama3Error(f"cannot create the cgroup {self.path} ({e.strerror}): run as root "
                              "on a machine with a memory cgroup controller") from None
        if self.v2:
            self._write("memory.max", limit_bytes)
            if (self.path / "memory.swap.max").exists():
                self._write("memory.swap.max", 0)
        else:
            self._write("memory.limit_in_bytes", limit_bytes)
        self.limit_bytes = limit_bytes

    @staticmethod
    def _parent_path() -> tuple[Path, bool]:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        for line in lines:  # cgroup v1: "4:memory:/path"
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                return Path("/sys/fs/cgroup/memory") / path.lstrip("/"), False
        for line in lines:  # cgroup v2: "0::/path", mounted at /sys/fs/cgroup (or /sys/fs/cgroup/unified)
            if line.startswith("0::"):
                for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                    controllers = root / "cgroup.controllers"
                    if controllers.exists() and "memory" in controllers.read_text().split():
                        return root / line[3:].lstrip("/"), True
        raise Llama3Error("no memory cgroup controller found in /proc/self/cgroup")

    def _write(self, name: str, value) -> None:
        (self.path / name).write_text(f"{value}\n")

    def join(self) -> None:
        """Move the calling process into the cgroup (run in the child, before exec)."""
        self._write("cgroup.procs", os.getpid())

    def peak_bytes(self) -> int:
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        return int((self.path / name).read_text())

    def remove(self) -> None:
        self.path.rmdir()


def drop_from_page_cache(folder: Path) -> int:
    """Ask the kernel to forget the cached pages of every file in `folder`; their total size."""
    total = 0
    for f in sorted(folder.iterdir()):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            total += f.stat().st_size
    return total


def run(args) -> int:
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise Llama3Error(f"{model}: no checkpoint there (make one: python tools/make_random_checkpoint.py llama3.1-8b)")
    cgroup = MemoryCgroup(int(args.limit_gib * 2 ** 30))
    try:
        stored = drop_from_page_cache(model)
        print(f"checkpoint {model}: {stored / 2 ** 30:.1f} GiB on disk, dropped from the page cache", file=sys.stderr)
        print(f"memory limit {args.limit_gib:g} GiB (cgroup {cgroup.path}); generating {args.n} tokens ...",
              file=sys.stderr)
        cmd = [sys.executable, "-m", "llama3_np", "generate", "-m", str(model), "--tokens", PROMPT,
               "-n", str(args.n), "--temp", "0", "--dtype", "bfloat16", "-t", str(args.threads), "--json"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO, preexec_fn=cgroup.join)
        wall = time.perf_counter() - t0
        peak = cgroup.peak_bytes()
    finally:
        cgroup.remove()
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = json.loads(done.stdout) if done.returncode == 0 and done.stdout.strip() else None
    generated = len(out["ids"]) if out else 0
    print(f"limit        {cgroup.limit_bytes / 2 ** 30:.2f} GiB")
    print(f"cgroup peak  {peak / 2 ** 30:.2f} GiB (process memory and the page cache charged to it)")
    print(f"peak RSS     {child.ru_maxrss / 2 ** 20:.2f} GiB (the process's resident pages, mapped weights included)")
    print(f"disk read    {child.ru_inblock * 512 / 2 ** 30:.1f} GiB ({child.ru_majflt} major page faults)")
    if out:
        t = out["timings"]
        print(f"generated    {generated} tokens after a {len(out['prompt_ids'])}-token prompt: prefill "
              f"{t['prefill_s']:.1f} s, decode {t['decode_tokens_per_s']:.3f} tok/s; {wall:.0f} s in all, "
              f"load included, {out['threads']} threads")
    else:
        print(f"generated    nothing: generate ended with exit status {done.returncode}"
              + (" (killed: SIGKILL, the limit's OOM killer)" if done.returncode == -9 else ""))
    return 0 if generated >= args.n else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", default=str(DEFAULT_MODEL), metavar="DIR",
                   help="checkpoint folder (default: weights/random-llama3.1-8b)")
    p.add_argument("--limit-gib", type=float, default=8.0, metavar="G", help="memory limit in GiB (default 8)")
    p.add_argument("-n", type=int, default=8, metavar="N", help="tokens to generate (default 8)")
    p.add_argument("-t", "--threads", type=int, default=default_threads(), metavar="N",
                   help="threads (default: one per core)")
    args = p.parse_args(argv)
    return run_tool("run_under_memory_limit", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
