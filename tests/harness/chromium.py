"""A real browser for tests and the demo: Debian's headless ``chromium``, driven through the
Chrome DevTools Protocol over a pipe (``--remote-debugging-pipe``).

Why a pipe and not WebDriver or a debugging port: the browser runs inside a simulated host's
network namespace (where the agent's listener is, on loopback), and the test runs outside it. A
TCP port (chromedriver's or DevTools') would live in that namespace, out of the test's reach;
a pipe is two file descriptors, which cross namespaces as they are. The protocol is JSON
messages, each ended by a NUL byte: fd 3 carries commands to the browser, fd 4 its answers and
events (https://chromedevtools.github.io/devtools-protocol/).

Every wait is bounded. ``close`` (or leaving the ``with`` block) asks the browser to quit, then
kills its process group (the browser and every renderer it forked: they share the group), so no
chromium outlives the test. Chromium as root needs ``--no-sandbox`` (its own sandbox, not ours).

Typical use::

    with Browser(tmp_path / "chromium", "host1") as browser:
        browser.open("http://127.0.0.1:9100/")
        browser.wait_for("document.querySelectorAll('.container').length >= 2")
        browser.screenshot(tmp_path / "page.png")
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.harness.probes import netns_path

CHROMIUM = "/usr/bin/chromium"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--mute-audio",
         "--window-size=1400,1000", "--remote-debugging-pipe")
_READ = 65536


class BrowserError(RuntimeError):
    """The browser did not start, a command failed, or a wait ran out."""


def available() -> bool:
    return shutil.which(CHROMIUM) is not None


class Browser:
    def __init__(self, workdir: Path, ns: str | None = None) -> None:
        """``ns``: the network namespace the browser runs in (a name or path; None: ours)."""
        self.workdir, self.ns = workdir, ns
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "chromium.log"
        self._to: int = -1
        self._from: int = -1
        self._buffer = b""
        self._next_id = 0
        self._session = ""
        self.events: list[dict[str, Any]] = []

    # -- life ------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd_r, cmd_w = os.pipe()  # we write commands, the browser reads fd 3
        out_r, out_w = os.pipe()  # the browser writes fd 4, we read
        prefix = ["nsenter", f"--net={netns_path(self.ns)}", "--"] if self.ns else []
        argv = [*prefix, CHROMIUM, *FLAGS, f"--user-data-dir={self.workdir / 'profile'}",
                "about:blank"]
        # bash puts the pipe ends at the numbers the protocol fixes (3 and 4), by way of two
        # free numbers (either end may itself be 3 or 4), then execs.
        script = (f'exec "$@" 100<&{cmd_r} 101>&{out_w} {cmd_r}<&- {out_w}>&- '
                  '3<&100 4>&101 100<&- 101>&-')
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["bash", "-c", script, "bash", *argv],
                                         pass_fds=(cmd_r, out_w), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, start_new_session=True)
        os.close(cmd_r)
        os.close(out_w)
        self._to, self._from = cmd_w, out_r
        self._session = self._attach(timeout)

    def _attach(self, timeout: float) -> str:
        """A session on the page the browser opened (``about:blank``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            targets = self.call("Target.getTargets", timeout=timeout, session=False)
            pages = [t for t in targets["targetInfos"] if t["type"] == "page"]
            if pages:
                found = self.call("Target.attachToTarget",
                                  {"targetId": pages[0]["targetId"], "flatten": True},
                                  session=False)
                return str(found["sessionId"])
            time.sleep(0.1)
        raise BrowserError(f"chromium opened no page in {timeout} s")

    def close(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(BrowserError, OSError):
            self.call("Browser.close", timeout=2.0, session=False)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        # Renderers and helpers share the browser's process group: none may outlive it. A
        # killed process takes a moment to die, so look again until none runs (bounded).
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(max(deadline - time.monotonic(), 0.01))
            if not self.survivors() or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        for fd in (self._to, self._from):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._to = self._from = -1

    def survivors(self) -> list[int]:
        """Processes of the browser's group that still run (zombies aside: in the sandbox's
        pid namespace the orphans' reaper may be the test itself, which never waits for them)."""
        if self.proc is None:
            return []
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):
                # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after ')'.
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == self.proc.pid and fields[0] not in ("Z", "X"):
                    found.append(int(stat.parent.name))
        return found

    def __enter__(self) -> Browser:
        try:
            self.start()
        except BaseException:
            self.close()  # a browser that did not come up is not left running
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the protocol ----------------------------------------------------------------------

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 10.0,
             session: bool = True) -> dict[str, Any]:
        """Send one command and wait (bounded) for its answer; events met meanwhile are kept."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method,
                                   "params": params or {}}
        if session:
            message["sessionId"] = self._session
        os.write(self._to, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            for reply in self._messages(deadline, method):
                if reply.get("id") != self._next_id:
                    self.events.append(reply)
                    continue
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message')}")
                result: dict[str, Any] = reply.get("result", {})
                return result

    def _messages(self, deadline: float, method: str) -> list[dict[str, Any]]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from], [], [], left)[0]:
                raise BrowserError(f"{method}: no answer from chromium (see {self.log})")
            chunk = os.read(self._from, _READ)
            if not chunk:
                raise BrowserError(f"{method}: chromium closed its pipe (see {self.log})")
            self._buffer += chunk
        *whole, self._buffer = self._buffer.split(b"\0")
        return [json.loads(m) for m in whole]

    # -- what a test does with a page ------------------------------------------------------

    def open(self, url: str, timeout: float = 15.0) -> None:
        found = self.call("Page.navigate", {"url": url}, timeout=timeout)
        if found.get("errorText"):
            raise BrowserError(f"{url}: {found['errorText']}")
        self.wait_for("document.readyState === 'complete'", timeout)

    def evaluate(self, expression: str, timeout: float = 10.0) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable values)."""
        found = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                          timeout=timeout)
        if "exceptionDetails" in found:
            raise BrowserError(f"{expression}: {found['exceptionDetails'].get('text')}")
        return found["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0, every: float = 0.1) -> Any:
        """The expression's value once it is truthy; BrowserError after ``timeout``."""
        deadline = time.monotonic() + timeout
        value: Any = None
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(every)
        raise BrowserError(f"not true after {timeout} s: {expression} (last: {value!r})")

    def screenshot(self, path: Path) -> Path:
        found = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport":
                                                     True}, timeout=20.0)
        path.write_bytes(base64.b64decode(found["data"]))
        return path
