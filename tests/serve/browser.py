"""Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: commands in on fd 3, replies
out on fd 4, each a JSON message ended by a NUL byte), so a test can type into a page, click and read its DOM without a
websocket library."""
from __future__ import annotations

import json
import os
import select
import subprocess
import time
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")


class Browser:
    """One headless Chromium; `events` collects every protocol event (console calls, log entries) in order."""

    def __init__(self, profile: Path, timeout: float = 30.0):
        profile.mkdir(parents=True, exist_ok=True)
        to_chrome, from_us = os.pipe()
        to_us, from_chrome = os.pipe()
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_chrome} 4>&{from_chrome}', str(CHROMIUM), "--headless",
             "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--remote-debugging-pipe",
             "about:blank"],
            pass_fds=(to_chrome, from_chrome), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self._out, self._in = from_us, to_us
        self._buffer, self._next_id, self.timeout = b"", 0, timeout
        self.events: list[dict] = []

    def send(self, method: str, session: str | None = None, **params) -> dict:
        """Send one command and return its result; events that arrive meanwhile go to `events`."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            if "method" in reply:
                self.events.append(reply)

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self._in, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed its debugging pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str) -> str:
        """Open `url` in a new tab with Runtime and Log events on; returns the tab's session id."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Runtime.enable", session)
        self.send("Log.enable", session)
        self.send("Page.enable", session)
        self.send("Page.navigate", session, url=url)
        self.wait_for(session, "document.readyState === 'complete'")
        return session

    def evaluate(self, session: str, expression: str):
        result = self.send("Runtime.evaluate", session, expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, session: str, expression: str, timeout: float | None = None):
        """Poll `expression` until it is truthy; returns its value."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            value = self.evaluate(session, expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after waiting: {expression}")
            time.sleep(0.1)

    def type_into(self, session: str, element_id: str, text: str) -> None:
        """Empty the field, focus it and insert `text` as a paste does."""
        element = f"document.getElementById({json.dumps(element_id)})"
        self.evaluate(session, f"(e => {{ e.value = ''; e.focus(); }})({element})")
        self.send("Input.insertText", session, text=text)

    def click(self, session: str, element_id: str) -> None:
        self.evaluate(session, f"document.getElementById({json.dumps(element_id)}).click()")

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._out)
        os.close(self._in)
