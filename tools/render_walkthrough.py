#!/usr/bin/env python3
"""Render a `llama3-np walkthrough` page to PNG with headless Chromium, offline, and check it.

    .venv/bin/python tools/render_walkthrough.py [-m DIR] [-p TEXT] [--layers L] [--heads H]
        [--html PAGE.html] [-o SHOT.png] [--width 1280] [--height 2200] [--at SECTION] [--measure]

Writes the page (or takes an existing one with --html), checks it is self-contained (every
`src`/`href` is a `data:` URI or an anchor in the page), then opens it in Chromium with no
network (in a new network namespace where `unshare -n` is allowed, and with every host name
unresolvable either way), driving it over its DevTools protocol: fails when the page logs a
console error or warning, throws, or fails to load something, and saves a screenshot of the
top `--height` pixels of the page, or from section `--at` (tokens, config, embedding, rope,
attention, swiglu, residual, logits) on. --measure also
writes the page of every layer and every head, and reports its size and the seconds it took.

Needs the `viz` extra (matplotlib) in the Python that runs it, and Chromium
(`apt-get install chromium`). The README's screenshot is docs/walkthrough.png:

    .venv/bin/python tools/render_walkthrough.py -o docs/walkthrough.png --at attention --width 1100 --height 1250
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tool_support import REPO, run_tool  # first: it makes this checkout's llama3_np importable

from llama3_np.errors import Llama3Error

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


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


class DevTools:
    """Chromium driven over its DevTools protocol on a pipe (--remote-debugging-pipe: commands in
    on fd 3, answers and events out on fd 4, each a JSON message ending in NUL)."""

    def __init__(self, cmd: list[str], log, timeout: float):
        to_browser, self.inbox = os.pipe(), os.pipe()
        self.write_fd, self.read_fd = to_browser[1], self.inbox[0]

        def give_pipes():  # in the child, before exec
            os.dup2(to_browser[0], 3)
            os.dup2(self.inbox[1], 4)

        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     preexec_fn=give_pipes, close_fds=False)
        os.close(to_browser[0])
        os.close(self.inbox[1])
        self.deadline = time.monotonic() + timeout
        self.buffer, self.events, self.next_id = b"", [], 0

    def message(self) -> dict:
        while b"\0" not in self.buffer:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.read_fd], [], [], left)[0]:
                raise Llama3Error("Chromium did not answer in time")
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise Llama3Error("Chromium closed the DevTools pipe")
            self.buffer += chunk
        text, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(text)

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.write_fd, json.dumps(msg).encode() + b"\0")
        while True:
            answer = self.message()
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise Llama3Error(f"Chromium: {method}: {answer['error'].get('message')}")
                return answer.get("result", {})
            self.events.append(answer)

    def wait_for(self, event: str) -> None:
        while not any(e.get("method") == event for e in self.events):
            self.events.append(self.message())

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except Llama3Error:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self.write_fd)
        os.close(self.read_fd)


def console_problems(events: list[dict]) -> list[str]:
    """Console errors and warnings, uncaught exceptions, and failed loads the page caused."""
    problems = []
    for e in events:
        method, params = e.get("method"), e.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning", "assert"):
            problems.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            problems.append(params.get("exceptionDetails", {}).get("text", "exception"))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") in ("error", "warning"):
            problems.append(params["entry"].get("text", ""))
    return problems


def screenshot(html: Path, png: Path, width: int, height: int, at: str | None) -> None:
    """The page's `height` pixels from its top (or from section `at`), `width` wide."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--disable-extensions", "--disable-background-networking", "--remote-debugging-pipe",
           "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9"]
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        cmd = ["unshare", "-n"] + cmd
    with tempfile.TemporaryDirectory() as profile, tempfile.TemporaryFile() as log:
        browser = DevTools(cmd + [f"--user-data-dir={profile}", "about:blank"], log, timeout=300)
        try:
            target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Runtime", "Log", "Page"):
                browser.call(f"{domain}.enable", session=session)
            browser.call("Emulation.setDeviceMetricsOverride",
                         {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session)
            browser.call("Page.navigate", {"url": html.resolve().as_uri()}, session)
            browser.wait_for("Page.loadEventFired")
            top = 0
            if at:
                found = browser.call("Runtime.evaluate", {
                    "expression": f"(e => e ? e.getBoundingClientRect().top + window.scrollY : -1)"
                                  f"(document.getElementById({json.dumps(at)}))", "returnByValue": True}, session)
                top = found["result"]["value"]
                if top < 0:
                    raise Llama3Error(f"--at {at}: the page has no such section")
            shot = browser.call("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": max(0, top - 16), "width": width, "height": height, "scale": 1}}, session)
        finally:
            browser.close()
    problems = console_problems(browser.events)
    if problems:
        raise Llama3Error(f"Chromium reported {len(problems)} console message(s), the first: {problems[0]}")
    png.write_bytes(base64.b64decode(shot["data"]))


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
