#!/usr/bin/env python3
"""The web console in a real headless Chromium, end to end (issue #17).

Starts target/debug/ballastd on free loopback ports, creates two queues
and publishes with the CLI (target/debug/ballast), opens the console in
headless Chromium driven over the DevTools protocol (a WebSocket client
written here on the standard library: no package to install), and checks:

1. the page loads with no console error, exception or failed request;
2. it lists the test's queues with their depth, the saturation bar
   coloured by the lane thresholds passed (green, amber past one);
3. after another publish it shows the new depth within 2 s;
4. a queue's page shows its lanes and the history the tick samples;
5. with an auth file, the page asks for a token (the API answers 401) and
   with a viewer's token lists only the queues it has `stats` on.

Writes target/console-screenshot.png (the queue list) and
target/console-queue-screenshot.png (a queue's page). Bounded: gives up
after 60 s. Usage: scripts/console_check.py [--chromium PATH]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")).resolve()
DEADLINE_S = 60
UPDATE_WITHIN_S = 2.0


def fail(message: str) -> None:
    print(f"console check FAILED: {message}", file=sys.stderr)
    sys.exit(1)


class WebSocket:
    """A minimal RFC 6455 client: text frames, masked sends, enough for
    the DevTools protocol on loopback."""

    def __init__(self, url: str) -> None:
        assert url.startswith("ws://"), url
        host_port, _, path = url[len("ws://") :].partition("/")
        host, _, port = host_port.partition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /{path} HTTP/1.1\r\nHost: {host_port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                fail("the DevTools WebSocket closed during the handshake")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            fail(f"DevTools WebSocket handshake refused: {head!r}")

    def send(self, text: str) -> None:
        payload = text.encode()
        header = bytearray([0x81])
        length = len(payload)
        if length < 126:
            header.append(0x80 | length)
        elif length < 1 << 16:
            header.append(0x80 | 126)
            header += struct.pack(">H", length)
        else:
            header.append(0x80 | 127)
            header += struct.pack(">Q", length)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes(header) + mask + masked)

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                fail("the DevTools WebSocket closed")
            data += chunk
        return data

    def receive(self) -> str:
        message = b""
        while True:
            first, second = self._exact(2)
            opcode = first & 0x0F
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack(">H", self._exact(2))
            elif length == 127:
                (length,) = struct.unpack(">Q", self._exact(8))
            payload = self._exact(length)
            if opcode == 0x8:
                fail("the browser closed the DevTools connection")
            if opcode in (0x9, 0xA):  # ping, pong: not expected from Chromium
                continue
            message += payload
            if first & 0x80:
                return message.decode()


class Page:
    """A DevTools session on one page: commands, and the errors it saw."""

    def __init__(self, ws_url: str) -> None:
        self.ws = WebSocket(ws_url)
        self.next_id = 0
        self.errors: list[str] = []
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        mine = self.next_id
        self.ws.send(json.dumps({"id": mine, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.receive())
            if message.get("id") == mine:
                if "error" in message:
                    fail(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            self.note(message)

    def note(self, event: dict[str, Any]) -> None:
        method = event.get("method", "")
        params = event.get("params", {})
        self.events.append(event)
        if method == "Runtime.exceptionThrown":
            self.errors.append(f"exception: {params['exceptionDetails']}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append(f"console.{params['type']}: {params.get('args')}")
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            self.errors.append(f"log: {entry.get('text')} {entry.get('url', '')}")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            fail(f"evaluating {expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, what: str, expression: str, timeout_s: float) -> Any:
        """Polls `expression` until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                fail(f"{what}: not within {timeout_s} s")
            time.sleep(0.05)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        print(f"screenshot: {path}")


def start_broker(work: Path, *extra: str) -> tuple[subprocess.Popen[str], str, str]:
    broker = subprocess.Popen(
        [
            str(TARGET / "debug" / "ballastd"),
            *extra,
            "--data-dir",
            str(work / "data"),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--disk-free-min-bytes",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert broker.stdout is not None
    grpc = broker.stdout.readline().strip().removeprefix("listening on ")
    metrics = broker.stdout.readline().strip().removeprefix("metrics on ")
    if not grpc or not metrics:
        fail("ballastd did not print its addresses")
    return broker, grpc, metrics


def cli(grpc: str, *args: str, token: str | None = None) -> None:
    env = dict(os.environ)
    env.pop("BALLAST_TOKEN", None)
    if token is not None:
        env["BALLAST_TOKEN"] = token
    subprocess.run(
        [str(TARGET / "debug" / "ballast"), "--addr", f"http://{grpc}", *args],
        check=True,
        stdout=subprocess.DEVNULL,
        env=env,
    )


def start_chromium(chromium: str, work: Path) -> tuple[subprocess.Popen[bytes], int]:
    profile = work / "chromium"
    browser = subprocess.Popen(
        [
            chromium,
            "--headless=new",
            "--no-sandbox",  # CI runs as root, where the sandbox cannot start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "--window-size=1360,900",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 20
    while not (port_file.exists() and port_file.read_text().strip()):
        if browser.poll() is not None:
            fail(f"chromium exited with {browser.returncode}")
        if time.monotonic() > deadline:
            fail("chromium did not open its DevTools port within 20 s")
        time.sleep(0.05)
    return browser, int(port_file.read_text().split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = parser.parse_args()
    if not args.chromium:
        fail("no chromium on PATH (scripts/test-console installs it)")
    signal.signal(signal.SIGALRM, lambda *_: fail(f"gave up after {DEADLINE_S} s"))
    signal.alarm(DEADLINE_S)

    with tempfile.TemporaryDirectory(prefix="ballast-console-") as tmp:
        work = Path(tmp)
        broker, grpc, metrics = start_broker(work)
        browser = None
        try:
            cli(grpc, "queue", "create", "console-a")
            # Five of six: past the low lane's threshold (70%), the bar is amber.
            cli(grpc, "queue", "create", "console-b", "--max-messages", "6")
            cli(grpc, "publish", "console-a", "a1", "a2", "a3")
            cli(grpc, "publish", "console-b", "b1", "b2", "b3", "b4", "b5")

            browser, port = start_chromium(args.chromium, work)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
                targets = json.load(response)
            target = next(t for t in targets if t.get("type") == "page")
            page = Page(target["webSocketDebuggerUrl"])
            for domain in ("Page", "Runtime", "Log", "Network"):
                page.call(f"{domain}.enable")
            page.call("Page.navigate", url=f"http://{metrics}/")

            depths = (
                "Object.fromEntries([...document.querySelectorAll('#queues tbody tr')]"
                ".map(r => [r.dataset.queue, Number(r.querySelector('td.depth').dataset.depth)]))"
            )
            page.wait_for(
                "the console lists console-a (3) and console-b (5)",
                f"(() => {{ const d = {depths}; return d['console-a'] === 3 && d['console-b'] === 5; }})()",
                10,
            )
            print(f"listed: {page.evaluate(depths)}")
            colours = "Object.fromEntries([...document.querySelectorAll('#queues tbody tr')].map(r => [r.dataset.queue, r.querySelector('.bar').className]))"
            bars = page.evaluate(colours)
            if bars.get("console-a") != "bar ok" or bars.get("console-b") != "bar warn":
                fail(f"saturation bars: console-a (0%) should be ok, console-b (83%, past 70%) warn: {bars}")

            cli(grpc, "publish", "console-a", "a4", "a5")
            published = time.monotonic()
            page.wait_for(
                "console-a's new depth (5) after a publish",
                f"{depths}['console-a'] === 5",
                UPDATE_WITHIN_S,
            )
            print(f"updated {time.monotonic() - published:.2f} s after the publish")
            page.wait_for(
                "the list's saturation bars", "document.querySelectorAll('#queues .bar .fill').length >= 2", 2
            )
            page.screenshot(TARGET / "console-screenshot.png")

            page.evaluate("location.hash = '#/queues/console-a'")
            page.wait_for(
                "console-a's page with its three lanes",
                "document.querySelectorAll('#lanes tbody tr').length === 3 && "
                "document.getElementById('queue-name').textContent === 'console-a'",
                3,
            )
            page.wait_for(
                "three history samples on console-a's page",
                "document.getElementById('history-span').textContent.startsWith('(last 3')"
                " || /\\(last [4-9]/.test(document.getElementById('history-span').textContent)",
                8,
            )
            page.screenshot(TARGET / "console-queue-screenshot.png")

            failed = [
                e["params"]
                for e in page.events
                if e.get("method") == "Network.loadingFailed"
                or (e.get("method") == "Network.responseReceived" and e["params"]["response"]["status"] >= 400)
            ]
            if failed:
                fail(f"failed requests: {failed}")
            if page.errors:
                fail("console errors: " + "; ".join(page.errors))
            print("console check passed: no console errors, queues listed, update within 2 s, queue page drawn")
            check_token_login(page, work, depths)
        finally:
            if browser is not None:
                browser.terminate()
                browser.wait(timeout=10)
            broker.send_signal(signal.SIGTERM)
            broker.wait(timeout=15)


def check_token_login(page: Page, work: Path, depths: str) -> None:
    """With an auth file: the page asks for a token (the API answers 401),
    and with a viewer's token lists only the queues it has `stats` on."""
    ops, viewer = "console-ops-token-0123456789", "console-viewer-token-0123456789"

    def digest(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    auth = work / "auth.toml"
    auth.write_text(
        f'[[principals]]\nname = "ops"\ntoken_sha256 = "{digest(ops)}"\n'
        'allow = [ { queues = "*", actions = ["admin", "publish", "stats"] } ]\n\n'
        f'[[principals]]\nname = "viewer"\ntoken_sha256 = "{digest(viewer)}"\n'
        'allow = [ { queues = "seen*", actions = ["stats"] } ]\n'
    )
    (work / "auth-data").mkdir()
    broker, grpc, metrics = start_broker(work / "auth-data", "--auth-file", str(auth))
    try:
        for queue in ("seen", "hidden"):
            cli(grpc, "queue", "create", queue, token=ops)
        cli(grpc, "publish", "seen", "s1", "s2", token=ops)
        page.errors.clear()
        page.call("Page.navigate", url=f"http://{metrics}/")
        page.wait_for(
            "the token form after a 401",
            f"location.host === {json.dumps(metrics)} && document.readyState === 'complete' && "
            "!!document.getElementById('login') && !document.getElementById('login').hidden",
            5,
        )
        page.evaluate(
            f"document.getElementById('token').value = {json.dumps(viewer)};"
            "document.getElementById('login').requestSubmit(); true"
        )
        page.wait_for("seen (2) listed with the viewer's token", f"{depths}['seen'] === 2", 5)
        listed = sorted(page.evaluate(depths))
        if listed != ["seen", "seen.dead"]:
            fail(f"the viewer sees only the queues it has stats on; listed {listed}")
        if not page.evaluate("document.getElementById('login').hidden"):
            fail("the token form is still shown after a good token")
        unexpected = [e for e in page.errors if "401" not in e]
        if unexpected:
            fail("console errors besides the expected 401: " + "; ".join(unexpected))
        print(f"token login passed: 401 asked for a token; the viewer's token lists {listed}")
    finally:
        broker.send_signal(signal.SIGTERM)
        broker.wait(timeout=15)


if __name__ == "__main__":
    main()
