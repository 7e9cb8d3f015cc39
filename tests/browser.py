"""Drive a real headless Chromium from tests, with the standard library alone.

Chromium is started with ``--remote-debugging-pipe`` and spoken to over the
Chrome DevTools Protocol on that pipe (fd 3 in, fd 4 out, messages separated by
NUL bytes): no TCP port, no websocket library, no driver binary, nothing
downloaded. Debian's ``chromium`` package is all it needs; when no browser is
found :func:`find_chromium` raises instead of letting a test skip, because CI
installs it.

Usage::

    with Browser() as browser:
        browser.open(Path("report.html"))
        browser.click("th[data-key=mse]")
        first = browser.evaluate("document.querySelector('tbody tr').dataset.block")
        browser.screenshot(Path("page.png"))
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

#: Flags that keep Chromium off the (closed) network and out of first-run UI.
CHROMIUM_FLAGS: tuple[str, ...] = (
    "--headless",
    "--no-sandbox",  # tests run as root, where the sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-pipe",
)

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class BrowserError(RuntimeError):
    """Chromium is missing, died, timed out, or a page script threw."""


def find_chromium() -> str:
    """Path of the Chromium to use: ``$CHROMIUM`` if set, else the first on ``PATH``."""
    override = os.environ.get("CHROMIUM")
    if override:
        return override
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    raise BrowserError(
        "no Chromium found on PATH (looked for " + ", ".join(_CANDIDATES) + "); "
        "install Debian's: apt-get install -y chromium"
    )


def _high_fd(fd: int) -> int:
    """A close-on-exec copy of ``fd`` numbered 10 or more, so ``3<&N 4>&M`` cannot clash."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Browser:
    """One headless Chromium with one page; use as a context manager."""

    def __init__(self, width: int = 1280, height: int = 900, timeout: float = 15.0) -> None:
        self.timeout = timeout
        self._profile = tempfile.TemporaryDirectory(prefix="lora-prune-chromium-")
        # Chromium's own output, read back only to explain a failure; closed in close().
        self._log = tempfile.TemporaryFile()  # noqa: SIM115
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []
        #: Messages of the alert/confirm/prompt dialogs the pages opened (all dismissed).
        self.dialogs: list[str] = []
        executable = find_chromium()
        cmd_read, cmd_write = (_high_fd(fd) for fd in os.pipe())
        res_read, res_write = (_high_fd(fd) for fd in os.pipe())
        # Chromium reads commands on fd 3 and answers on fd 4. bash moves the pipes there
        # (dash refuses fd numbers above 9), so no Python code runs between fork and exec.
        bash = shutil.which("bash") or "/bin/bash"
        argv = [
            bash,
            "-c",
            f'exec "$0" "$@" 3<&{cmd_read} 4>&{res_write} {cmd_read}<&- {res_write}>&-',
            executable,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={self._profile.name}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=self._log,
                pass_fds=(cmd_read, res_write),
            )
        except OSError as exc:
            self._profile.cleanup()
            raise BrowserError(f"cannot start {executable}: {exc}") from exc
        finally:
            os.close(cmd_read)
            os.close(res_write)
        self._out = cmd_write
        self._in = res_read
        try:
            self._session = self._attach(width, height)
        except BaseException:
            self.close()
            raise

    # -- protocol ---------------------------------------------------------------

    def _fail(self, what: str) -> BrowserError:
        self._log.seek(0)
        tail = self._log.read()[-3000:].decode("utf-8", "replace")
        return BrowserError(f"{what}; chromium output:\n{tail}")

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._fail(f"no answer from chromium within {self.timeout} s")
            ready, _, _ = select.select([self._in], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise self._fail("chromium closed the debugging pipe (it exited)")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        message: dict[str, Any] = json.loads(raw)
        return message

    def _write(self, method: str, params: dict[str, Any] | None, session: bool) -> int:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session and getattr(self, "_session", None):
            message["sessionId"] = self._session
        data = json.dumps(message).encode("utf-8") + b"\0"
        try:
            while data:
                data = data[os.write(self._out, data) :]
        except BrokenPipeError as exc:
            raise self._fail("chromium is gone") from exc
        return self._next_id

    def send(
        self, method: str, params: dict[str, Any] | None = None, *, session: bool = True
    ) -> Any:
        """Send one CDP command (to the page's session unless ``session=False``) and return its result."""
        wanted = self._write(method, params, session)
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == wanted:
                break
            if reply.get("method") == "Page.javascriptDialogOpening":
                # An alert() blocks the page and every later command: record it (a test
                # can treat it as injected script) and dismiss it without waiting.
                self.dialogs.append(str(reply.get("params", {}).get("message", "")))
                self._write("Page.handleJavaScriptDialog", {"accept": False}, True)
            elif "method" in reply:
                # Kept for debugging only; bounded so a long session cannot grow it forever.
                self._events = [*self._events[-99:], reply]
        if "error" in reply:
            raise BrowserError(f"{method} failed: {reply['error']}")
        return reply.get("result", {})

    def _attach(self, width: int, height: int) -> str:
        targets = self.send("Target.getTargets", session=False)["targetInfos"]
        pages = [t for t in targets if t.get("type") == "page"]
        if pages:
            target = pages[0]["targetId"]
        else:
            target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)[
                "targetId"
            ]
        attached = self.send(
            "Target.attachToTarget", {"targetId": target, "flatten": True}, session=False
        )
        session: str = attached["sessionId"]
        self._session = session
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        return session

    # -- page actions -------------------------------------------------------------

    def evaluate(self, expression: str) -> Any:
        """Value of a JavaScript expression in the page (JSON-able; promises are awaited)."""
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"page script failed: {text}\n  in: {expression}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float | None = None) -> Any:
        """Poll ``expression`` until it is truthy; return its value."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for: {expression}")
            time.sleep(0.05)

    def open(self, target: Path | str) -> None:
        """Load a file (a :class:`Path`) or URL and wait until it and its eager images loaded."""
        url = target.resolve().as_uri() if isinstance(target, Path) else target
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"cannot open {url}: {result['errorText']}")
        self.wait_for("document.readyState === 'complete' && location.href === " + json.dumps(url))

    def center_of(self, selector: str) -> tuple[float, float]:
        """Viewport coordinates of the middle of the first element matching ``selector``."""
        point = self.evaluate(
            "(() => { const el = document.querySelector(" + json.dumps(selector) + ");"
            " if (!el) { return null; }"
            " el.scrollIntoView({block: 'center', inline: 'center'});"
            " const r = el.getBoundingClientRect();"
            " return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        if point is None:
            raise BrowserError(f"no element matches {selector!r}")
        return float(point[0]), float(point[1])

    def click(self, selector: str) -> None:
        """A real left click (mouse down + up) on the middle of the element."""
        x, y = self.center_of(selector)
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        for kind in ("mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": x, "y": y, "button": "left", "buttons": 1, "clickCount": 1},
            )

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        """Save a PNG of the viewport, or of the whole page when ``full_page``."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params["captureBeyondViewport"] = True
            params["clip"] = {
                "x": 0,
                "y": 0,
                "width": size["width"],
                "height": size["height"],
                "scale": 1,
            }
        data = self.send("Page.captureScreenshot", params)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    # -- teardown -----------------------------------------------------------------

    def close(self) -> None:
        """Ask Chromium to quit, kill it if it does not, and remove its profile."""
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(BrowserError, OSError):
                self.send("Browser.close", session=False)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for fd_name in ("_out", "_in"):
            fd = getattr(self, fd_name, None)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, fd_name, None)
        self._log.close()
        self._profile.cleanup()

    def __enter__(self) -> Browser:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
