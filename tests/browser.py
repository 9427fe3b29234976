"""Open a page in headless Chromium through the DevTools protocol and report what a reader's browser
met: console errors, uncaught exceptions, requests that left the file, and rendered figures.

Chromium comes from Debian's `chromium` package; `ensure_chromium` installs it with apt-get where
missing (as root) and otherwise says why it cannot, for the test to skip with that reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

_LOCAL = ("file:", "data:", "blob:", "about:")


def ensure_chromium() -> str:
    """The chromium binary, installing Debian's package where missing; RuntimeError saying why where it cannot."""
    found = shutil.which("chromium")
    if found:
        return found
    if shutil.which("apt-get") is None:
        raise RuntimeError("no chromium and no apt-get to install it (not a Debian-like system)")
    if os.geteuid() != 0:
        raise RuntimeError("no chromium, and installing it with apt-get needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
    found = shutil.which("chromium")
    if found is None:
        raise RuntimeError("apt-get installed chromium but it is not on PATH")
    return found


@dataclass
class PageVisit:
    console_errors: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)
    figures: int = 0
    rendered_figures: int = 0


class _Session:
    def __init__(self, ws: Any):
        self.ws = ws
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, session: str | None = None, **params: object) -> dict:
        self.next_id += 1
        msg: dict = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        while True:
            got = json.loads(self.ws.recv(timeout=60))
            if got.get("id") == self.next_id:
                if "error" in got:
                    raise RuntimeError(f"{method}: {got['error']}")
                return got.get("result", {})
            self.events.append(got)

    def drain(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                self.events.append(json.loads(self.ws.recv(timeout=left)))
            except TimeoutError:
                return


def visit(chromium: str, page: Path, settle_s: float = 1.5) -> PageVisit:
    """Load `page`, wait for it to settle, and return what happened."""
    profile = tempfile.mkdtemp(prefix="pdbench-chromium-")
    proc = subprocess.Popen(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "--window-size=1400,1000",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ws_url = None
        deadline = time.monotonic() + 60
        while ws_url is None and time.monotonic() < deadline:
            line = proc.stderr.readline() if proc.stderr else ""
            if m := re.search(r"DevTools listening on (ws://\S+)", line):
                ws_url = m.group(1)
            elif not line and proc.poll() is not None:
                break
        if ws_url is None:
            raise RuntimeError("chromium did not open its DevTools port")
        with connect(ws_url, max_size=None, open_timeout=30) as ws:
            return _visit(_Session(ws), page, settle_s)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


def _visit(s: _Session, page: Path, settle_s: float) -> PageVisit:
    target = s.call("Target.createTarget", url="about:blank")["targetId"]
    sid = s.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    for domain in ("Runtime.enable", "Log.enable", "Network.enable", "Page.enable"):
        s.call(domain, session=sid)
    s.call("Page.navigate", session=sid, url=page.resolve().as_uri())
    loaded = False
    deadline = time.monotonic() + 60
    while not loaded and time.monotonic() < deadline:
        s.drain(0.2)
        loaded = any(e.get("method") == "Page.loadEventFired" for e in s.events)
    s.drain(settle_s)
    counts = s.call(
        "Runtime.evaluate",
        session=sid,
        returnByValue=True,
        # A figure is rendered when Plotly drew at least one trace into its SVG.
        expression="[document.querySelectorAll('.plotly-graph-div').length,"
        " Array.from(document.querySelectorAll('.plotly-graph-div')).filter(d => d.querySelector('.main-svg .trace')).length]",
    )["result"]["value"]
    out = PageVisit(figures=counts[0], rendered_figures=counts[1])
    for e in s.events:
        p = e.get("params", {})
        if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.console_errors.append(" ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
        elif e.get("method") == "Runtime.exceptionThrown":
            out.console_errors.append(p["exceptionDetails"].get("exception", {}).get("description") or p["exceptionDetails"]["text"])
        elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
            out.console_errors.append(p["entry"]["text"])
        elif e.get("method") == "Network.requestWillBeSent" and not p["request"]["url"].startswith(_LOCAL):
            out.external_requests.append(p["request"]["url"])
    return out
