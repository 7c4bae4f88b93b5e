"""Serving the Streamlit app and photographing it in headless Chromium: the app's end-to-end test and the
screenshots in docs/ use this.

A Streamlit page draws only after its websocket has delivered the script's output, so a one-shot
`chromium --screenshot` catches the loading skeleton. Instead Chromium is driven over the DevTools protocol
(through tornado's websocket client, which Streamlit already depends on): navigate, poll a JavaScript condition
until the page has rendered what is expected, then capture. Chromium is Debian's `chromium` (`find_chromium`
installs it with apt-get when it is missing and we are root).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
                  "--disable-dev-shm-usage", "--mute-audio")
# the page has rendered: at least N plotly charts drawn, Streamlit idle, no spinner and no skeleton left
READY_JS = """(() => {{
  const plots = [...document.querySelectorAll('.js-plotly-plot')].filter(p => p.querySelector('.main-svg'));
  const busy = document.querySelector('[data-testid="stStatusWidget"], [data-testid="stSpinner"], '
    + '[data-testid="stSkeleton"], [data-testid="stAppSkeleton"]');
  return plots.length >= {n} && !busy;
}})()"""


def find_chromium(install: bool = True) -> str | None:
    """The chromium executable; when missing and `install`, `apt-get install -y chromium` (root only) first."""
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    if install and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
                    ["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
            subprocess.run(cmd, env=env, capture_output=True, timeout=900)
            if path := shutil.which("chromium"):
                return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_app(script: str | Path, *args: str, port: int | None = None, cwd: str | Path | None = None,
              timeout: float = 120, env: dict | None = None):
    """Run `streamlit run script -- args` on 127.0.0.1 (headless) until the block ends; yields the base URL."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", str(script), "--server.headless", "true", "--server.port",
           str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none", "--", *args]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"streamlit exited with {proc.returncode}: {log.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"streamlit did not answer on {url} within {timeout:.0f} s")
            time.sleep(0.3)
        yield url
    finally:
        _stop(proc)
        log.close()


def _stop(proc: subprocess.Popen) -> None:
    """Terminate a child, killing it if it has not exited within 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def chromium(executable: str | None = None):
    """A headless Chromium with a fresh profile and a DevTools port; yields the port."""
    exe = executable or find_chromium()
    if exe is None:
        raise RuntimeError("chromium not found (apt-get install -y chromium)")
    profile = tempfile.mkdtemp(prefix="ecviz-chromium-")
    proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        active = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (active.is_file() and active.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("chromium did not start its DevTools server")
            time.sleep(0.1)
        yield int(active.read_text().split()[0])
    finally:
        _stop(proc)
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(port: int, url: str, width: int = 1400, height: int = 1000, ready: str | None = None,
               timeout: float = 120, settle: float = 1.0) -> bytes:
    """Load url in the Chromium on DevTools port `port` at width × height, wait until the JavaScript
    expression `ready` is true (default: the page drew at least one plotly chart), wait `settle` more seconds
    and return a PNG of the viewport."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
        targets = json.loads(r.read())
    ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")
    return asyncio.run(_capture(ws_url, url, width, height, ready or READY_JS.format(n=1), timeout, settle))


async def _capture(ws_url, url, width, height, ready, timeout, settle) -> bytes:
    from tornado.websocket import websocket_connect

    ws = await websocket_connect(ws_url, max_message_size=256 << 20)
    counter = 0

    async def call(method: str, **params):
        nonlocal counter
        counter += 1
        me = counter
        await ws.write_message(json.dumps({"id": me, "method": method, "params": params}))
        while True:
            raw = await ws.read_message()
            if raw is None:
                raise RuntimeError("chromium closed the DevTools connection")
            msg = json.loads(raw)
            if msg.get("id") == me:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    try:
        await call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                   mobile=False)
        await call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while True:
            r = await call("Runtime.evaluate", expression=ready, returnByValue=True)
            if r.get("result", {}).get("value"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not render within {timeout:.0f} s")
            await asyncio.sleep(0.25)
        await asyncio.sleep(settle)
        shot = await call("Page.captureScreenshot", format="png")
        return base64.b64decode(shot["data"])
    finally:
        ws.close()
