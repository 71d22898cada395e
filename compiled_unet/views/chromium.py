"""Look at a page as a person would: headless Chromium, driven over the DevTools protocol on a pipe
(--remote-debugging-pipe: no port, no client library), waiting until the page's text shows what we expect,
then a PNG screenshot. Used by the tests and to make the README's screenshot.

    with Browser() as b:
        text = b.open("http://127.0.0.1:8765/?data=...", wait_for=["down_blocks.0"], timeout=60)
        b.screenshot("view.png")

The flags: headless, no sandbox (containers run as root), no GPU (SwiftShader draws WebGL), and no
background networking, component updates, sync or QUIC: on a closed network those make Chromium hang.
"""
from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

from .._atomic import write_atomic

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-unsafe-swiftshader", "--hide-scrollbars", "--remote-debugging-pipe")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary ($CHROMIUM, then Debian's chromium, then others), or None."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env if os.path.isfile(env) else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    def __init__(self, width: int = 1600, height: int = 1000, binary: str | None = None):
        self.binary = binary or find_chromium()
        if self.binary is None:
            raise FileNotFoundError("Chromium not found: install Debian's `chromium` (apt-get install -y chromium) "
                                    "or set $CHROMIUM")
        self.width, self.height = width, height
        self._id = 0
        self.proc = None

    # ----- process and protocol
    def __enter__(self):
        self._profile = tempfile.mkdtemp(prefix="cu-chromium-")  # a fresh profile every time
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Chromium reads commands on fd 3 and writes answers on fd 4 (set up in the child by _pipe_fds).
        self.proc = subprocess.Popen(
            [self.binary, *FLAGS, f"--user-data-dir={self._profile}", f"--window-size={self.width},{self.height}",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=_pipe_fds(to_chrome_r, from_chrome_w))
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        targets = self._send("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self._session = self._send("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        self._send("Page.enable", session=True)
        self._send("Emulation.setDeviceMetricsOverride", session=True, width=self.width, height=self.height,
                   deviceScaleFactor=1, mobile=False)
        return self

    def __exit__(self, *exc):
        try:
            if self.proc and self.proc.poll() is None:
                try:
                    self._send("Browser.close", timeout=5)
                except Exception:  # noqa: BLE001 - closing anyway
                    pass
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            for fd in (self._to_chrome, self._from_chrome):
                try:
                    os.close(fd)
                except OSError:
                    pass
            shutil.rmtree(self._profile, ignore_errors=True)
        return False

    def _send(self, method: str, session: bool = False, timeout: float = 60, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self._session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buf:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Chromium did not answer {method} within {timeout:.0f} s")
                ready, _, _ = select.select([self._from_chrome], [], [], 1.0)
                if ready:
                    chunk = os.read(self._from_chrome, 1 << 20)
                    if not chunk:
                        raise RuntimeError(f"Chromium exited while waiting for {method}")
                    self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"Chromium {method}: {reply['error']}")
                return reply.get("result", {})

    # ----- what tests use
    def evaluate(self, expression: str):
        r = self._send("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        return r.get("result", {}).get("value")

    def open(self, url: str, wait_for: tuple | list = (), timeout: float = 90, settle: float = 1.0) -> str:
        """Navigate to `url` and wait until the page text contains every string of `wait_for`; returns the
        text (document.body.innerText). TimeoutError lists what was missing and the start of the text."""
        self._send("Page.navigate", session=True, url=url)
        deadline = time.monotonic() + timeout
        text = ""
        while True:
            text = self.evaluate("document.body ? document.body.innerText : ''") or ""
            missing = [w for w in wait_for if w not in text]
            if not missing and self.evaluate("document.readyState") == "complete":
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url[:80]}: after {timeout:.0f} s the page lacks {missing}; it shows: "
                                   f"{text[:400]!r}")
            time.sleep(0.5)
        time.sleep(settle)  # let the last frame draw (WebGL canvases draw after the text appears)
        return self.evaluate("document.body.innerText") or text

    def screenshot(self, path: str, full_page: bool = False) -> bytes:
        params = {"format": "png"}
        if full_page:
            h = int(self.evaluate("Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)") or 0)
            params["clip"] = {"x": 0, "y": 0, "width": self.width, "height": max(h, self.height), "scale": 1}
            params["captureBeyondViewport"] = True
        png = base64.b64decode(self._send("Page.captureScreenshot", session=True, **params)["data"])
        write_atomic(path, png)
        return png


def _pipe_fds(read_fd: int, write_fd: int):
    """preexec_fn putting the pipe ends on fds 3 and 4 in the child, as --remote-debugging-pipe expects."""
    def setup():
        r, w = os.dup(read_fd), os.dup(write_fd)
        os.dup2(r, 3)
        os.dup2(w, 4)
        os.set_inheritable(3, True)
        os.set_inheritable(4, True)
        os.closerange(5, 65536)  # nothing else of ours (our ends of the pipes included) leaks into Chromium
    return setup
