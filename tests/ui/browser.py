"""Playwright driving Debian's chromium (no browser download) inside a network namespace: the admin's
browser sits on the lab network like a teacher's desk PC, reaching the dashboard on bootd's address.

Each page load collects console errors; `axe` runs axe-core (bundled by axe-playwright-python) in the page.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"


def have_chromium() -> bool:
    return os.path.exists(CHROMIUM)


def launch(pw: Playwright, netns: str, tmp: Path) -> Browser:
    """Chromium in `netns` (ip netns exec execs it: the pid Playwright holds is chromium's own)."""
    wrapper = tmp / "chromium-in-netns"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {netns} {CHROMIUM} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return pw.chromium.launch(executable_path=str(wrapper), args=["--no-sandbox", "--disable-gpu"])


class ConsoleWatch:
    """Console errors and uncaught page errors of one page."""

    def __init__(self, page: Page):
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":
            self.errors.append(f"console: {msg.text}")


def axe(page: Page) -> list[dict]:
    """axe-core's violations of the page (impact, id, help, nodes). Raises if axe checked nothing (a page
    that did not load, or axe not running, must not pass as "no violations")."""
    import axe_playwright_python
    script = (Path(axe_playwright_python.__file__).parent / "axe.min.js").read_text()
    page.evaluate(script)
    result = page.evaluate("async () => await axe.run(document)")
    assert len(result["passes"]) >= 10, f"axe-core checked only {len(result['passes'])} rules"
    return [{"impact": v["impact"], "id": v["id"], "help": v["help"],
             "nodes": [n["target"] for n in v["nodes"]][:5]} for v in result["violations"]]


def shot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def save_json(name: str, data: object) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / name).write_text(json.dumps(data, indent=2))
