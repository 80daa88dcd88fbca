"""Debian's chromium driven by Python playwright (installed from PyPI with
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1: no browser download) and axe-core from npm, cached in
``.cache/console`` (ignored) by :func:`install_axe`. Used by tests/console."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "console"
AXE_VERSION = "4.14.1"
CHROMIUM = "/usr/bin/chromium"


def install_axe() -> Path:
    """axe-core's browser build (npm, once, into the ignored cache); its path."""
    script = CACHE / "node_modules" / "axe-core" / "axe.min.js"
    package = script.with_name("package.json")
    if not script.exists() or f'"version": "{AXE_VERSION}"' not in package.read_text():
        if shutil.which("npm") is None:
            raise RuntimeError("npm is not installed (Debian npm): the console tests inject axe-core from npm")
        CACHE.mkdir(parents=True, exist_ok=True)
        if not (CACHE / "package.json").exists():
            (CACHE / "package.json").write_text('{"private": true}\n')
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", f"axe-core@{AXE_VERSION}"], cwd=CACHE, check=True,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    return script


def launch(playwright: Any) -> Any:
    if not Path(CHROMIUM).exists():
        raise RuntimeError("Debian chromium is not installed (apt-get install chromium; deploy/install-viewer.sh does it)")
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])


def axe_violations(page: Any, axe_script: Path, impacts: tuple[str, ...] = ("serious", "critical")) -> list[str]:
    """Run axe-core in the page (the context must bypass the console's CSP to inject it)."""
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.add_script_tag(path=str(axe_script))
    result = page.evaluate("async () => await window.axe.run(document, {resultTypes: ['violations']})")
    return [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:5]}"
        for v in result["violations"] if v.get("impact") in impacts
    ]  # fmt: skip
