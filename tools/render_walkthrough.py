#!/usr/bin/env python3
"""Render a `llama3-np walkthrough` page to PNG with headless Chromium, offline, and check it.

    .venv/bin/python tools/render_walkthrough.py [-m DIR] [-p TEXT] [--layers L] [--heads H]
        [--html PAGE.html] [-o SHOT.png] [--width 1280] [--height 2200] [--at SECTION] [--measure]

Writes the page (or takes an existing one with --html), checks it is self-contained (every
`src`/`href` is a `data:` URI or an anchor in the page), then opens it in Chromium with no
network (in a new network namespace where `unshare -n` is allowed, and with every host name
unresolvable either way), fails when Chromium reports a console message of level warning or
error, and saves a screenshot of the top `--height` pixels of the page, or of the page from
section `--at` (tokens, config, embedding, rope, attention, swiglu, residual, logits) on. --measure also
writes the page of every layer and every head, and reports its size and the seconds it took.

Needs the `viz` extra (matplotlib) in the Python that runs it, and Chromium
(`apt-get install chromium`). The README's screenshot is docs/walkthrough.png:

    .venv/bin/python tools/render_walkthrough.py -o docs/walkthrough.png --at attention --width 1100 --height 1250
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tool_support import REPO, run_tool  # first: it makes this checkout's llama3_np importable

from llama3_np.errors import Llama3Error

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
# Chromium logs console messages as `...:INFO:CONSOLE(12)] "text", source: ... (12)`, with the level
# in the `--enable-logging` prefix; warnings and errors fail the check.
CONSOLE = re.compile(r":(WARNING|ERROR):CONSOLE\(|:INFO:CONSOLE\(\d+\)\] \"(Uncaught|Failed|Refused)")


def write_page(args, html: Path, layers: str | None, heads: str | None) -> float:
    """Seconds `llama3-np walkthrough` took, in a process of its own."""
    cmd = [sys.executable, "-m", "llama3_np", "walkthrough", "-p", args.prompt, "-o", str(html)]
    cmd += ["-m", args.model] if args.model else []
    cmd += ["--layers", layers] if layers else []
    cmd += ["--heads", heads] if heads else []
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise Llama3Error(f"llama3-np walkthrough failed: {proc.stderr.strip()}")
    return seconds


def check_self_contained(html: Path) -> None:
    text = html.read_text(encoding="utf-8")
    for attr, value in re.findall(r'\b(src|href)="([^"]*)"', text):
        if not (value.startswith("data:") or value.startswith("#")):
            raise Llama3Error(f"{html}: {attr}={value[:80]!r} points outside the page")
    if re.search(r"<script|<link|@import|url\(", text, re.IGNORECASE):
        raise Llama3Error(f"{html}: the page loads a script, style sheet or resource")


def chromium() -> str:
    for name in CHROMIUM_NAMES:
        if shutil.which(name):
            return shutil.which(name)
    raise Llama3Error("Chromium is not installed: apt-get install chromium")


def screenshot(html: Path, png: Path, width: int, height: int, at: str | None) -> None:
    with tempfile.TemporaryDirectory() as profile:
        if at:  # a headless screenshot does not scroll: hide what comes before the section instead
            text = html.read_text(encoding="utf-8")
            if f'<section id="{at}">' not in text:
                raise Llama3Error(f"--at {at}: the page has no such section")
            html = Path(profile) / "from_section.html"
            html.write_text(text.replace("</style>", f"body > *:has(~ #{at}) {{ display: none; }}</style>", 1),
                            encoding="utf-8")
        cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--no-first-run", "--disable-extensions", "--disable-background-networking",
               "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9",
               "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}",
               f"--window-size={width},{height}", f"--screenshot={png.resolve()}",
               html.resolve().as_uri()]
        if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
            cmd = ["unshare", "-n"] + cmd
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    console = [line for line in proc.stderr.splitlines() if CONSOLE.search(line)]
    if console:
        raise Llama3Error(f"Chromium reported console messages: {console[0]}")
    if proc.returncode or not png.is_file():
        raise Llama3Error(f"Chromium failed (exit {proc.returncode}): {proc.stderr.strip()[-400:]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", help="checkpoint folder (default: the default model)")
    p.add_argument("-p", "--prompt", default="The capital of France is")
    p.add_argument("--layers", help="--layers of the walkthrough (default: its own)")
    p.add_argument("--heads", help="--heads of the walkthrough (default: its own)")
    p.add_argument("--html", type=Path, help="render this page instead of writing one")
    p.add_argument("-o", "--output", type=Path, default=Path("walkthrough.png"), help="screenshot to write")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=2200)
    p.add_argument("--at", help="start the screenshot at this section (its id, e.g. attention)")
    p.add_argument("--measure", action="store_true",
                   help="also write the page of all layers and heads and report its size and time")
    args = p.parse_args()

    def body():
        with tempfile.TemporaryDirectory() as tmp:
            html = args.html
            if html is None:
                html = Path(tmp) / "walkthrough.html"
                seconds = write_page(args, html, args.layers, args.heads)
                print(f"page: {html.stat().st_size / 1e6:.2f} MB in {seconds:.1f} s")
            check_self_contained(html)
            screenshot(html, args.output, args.width, args.height, args.at)
            print(f"wrote {args.output} ({args.output.stat().st_size / 1e3:.0f} KB), no console messages")
            if args.measure:
                full = Path(tmp) / "all.html"
                seconds = write_page(args, full, "all", "all")
                check_self_contained(full)
                print(f"--layers all --heads all: {full.stat().st_size / 1e6:.2f} MB in {seconds:.1f} s")
    return run_tool("render_walkthrough", body, subprocess.TimeoutExpired)


if __name__ == "__main__":
    sys.exit(main())
