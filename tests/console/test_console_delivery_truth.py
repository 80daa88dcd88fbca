"""What the admin sees when results go nowhere or the PACS is down (issue 21), in a real browser
(Debian chromium via playwright) against a real ``anatomix-node serve`` (embedded workers, demo
weights) and DCMTK storescp as the PACS.

One scenario, as the issue lived it: the PACS added as a destination but not a default one, a study
analysed: it is flagged "undelivered" on the studies list, the dashboard and the failures page say
results go nowhere. Then the PACS is made the default while it is down: within the first retries
the dashboard, the nodes page and the failures page show it "down" with objects waiting and the
reason, long before the retry window ends. Then the PACS starts: the objects go, it shows "ok".
Screenshots at 1366 and 390 px wide in test-output/console-truth-*.png; axe-core on each page.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest

from dicom_node.api import auth
from dicom_node.cli.processes import node_command
from dicom_node.store.base import RemoteNode
from tests.console.test_console_scenario import Pages, login, wait_http
from tests.support.console_browser import install_axe, launch
from tests.support.dcmtk import StoreScp
from tests.support.net import free_port
from tests.support.workers import REPO, NodeSite, make_chest_studies, storescu

pytestmark = pytest.mark.timeout(900)

WIDE, PHONE = {"width": 1366, "height": 900}, {"width": 390, "height": 844}


def shots(page, pages: Pages, name: str) -> None:
    """Axe and a screenshot at 1366 px, then a screenshot at 390 px (phone) of the same page."""
    page.set_viewport_size(WIDE)
    pages.check(page, f"truth-{name}-1366")
    page.set_viewport_size(PHONE)
    page.screenshot(path=str(pages.output_dir / f"console-truth-{name}-390.png"), full_page=True)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"] + 1, f"{name}: the page scrolls sideways on a phone ({width} px wide)"
    page.set_viewport_size(WIDE)


def cli(site: NodeSite, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}  # whole lines, not clipped to a terminal
    done = subprocess.run(node_command(*args, "--config", str(site.config_path)), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_no_destination_then_pacs_down_then_up_in_chromium(tmp_path: Path, output_dir: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    axe = install_axe()
    http_port = free_port()
    site = NodeSite(tmp_path / "site", overrides={
        "http": {"port": http_port},
        "model": {"tasks": ["anatomy_grounding"]},
        "delivery": {"max_attempts": 50, "backoff_base_s": 1.0, "backoff_max_s": 3.0, "timeout_s": 5.0},
    })  # fmt: skip
    site.add_remote(RemoteNode("modality", "MODALITY", "127.0.0.1", 104, role="source"))
    pacs_port = free_port()
    pacs_node = RemoteNode("pacs", "PACS", "127.0.0.1", pacs_port, role="destination")  # as `ae add ... --role destination` leaves it
    site.add_remote(pacs_node)
    password = auth.generate_password()
    store = site.store()
    try:
        store.add_api_user(auth.new_user("admin1", "admin", password))
    finally:
        store.close()
    files = make_chest_studies(tmp_path / "studies", 2)
    first, second = (str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in files)
    base = f"http://127.0.0.1:{http_port}"
    pages = Pages(output_dir, axe)
    pacs: StoreScp | None = None
    try:
        site.serve()
        wait_http(base, site)
        serve_log = (site.root / "serve.log").read_text(errors="replace")
        assert "results go nowhere: pacs is a destination but not a default one" in serve_log  # said at start-up
        with sync_playwright() as playwright:
            browser = launch(playwright)
            page = browser.new_context(viewport=WIDE, bypass_csp=True).new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            login(page, base, "admin1", password)

            # ---- no destination: done, but flagged undelivered everywhere ---------------------------------
            storescu(site.port, site.ae_title, files[:1])
            row = page.locator(f'tr[data-study="{first}"]')
            row.wait_for(timeout=60_000)
            row.locator(".state-undelivered").wait_for(timeout=300_000)
            expect(row.locator(".state-done")).to_be_visible()
            log = (site.root / "serve.log").read_text(errors="replace")
            assert "WARNING" in log and f"study {first} v1 undelivered: results went nowhere" in log
            shots(page, pages, "studies-undelivered")
            page.goto(base + "/console/")
            expect(page.locator("[data-nowhere]")).to_contain_text("pacs is a destination but not a default one")
            expect(page.locator("[data-undelivered]")).to_contain_text("1 study was analysed but sent nowhere")
            shots(page, pages, "dashboard-nowhere")
            page.goto(base + "/console/failures")
            expect(page.locator("[data-undelivered]")).to_be_visible()
            expect(page.locator('tr[data-destination="pacs"]')).to_contain_text("unused")
            api = page.request  # the same session, through the operations API
            assert api.get(f"{base}/api/studies/{first}").json()["outcome"] == "undelivered"
            truth = api.get(f"{base}/api/destinations").json()
            assert truth["undelivered_studies"] == 1 and "pacs is a destination but not a default one" in truth["results_go_nowhere"]
            assert api.get(f"{base}/api/status").json()["undelivered_studies"] == 1

            # ---- the PACS made the default while it is down: "down", objects waiting, within minutes ------
            store = site.store()
            try:
                store.update_remote_node(replace(pacs_node, default_destination=True))
            finally:
                store.close()
            started = time.monotonic()
            storescu(site.port, site.ae_title, files[1:])
            page.goto(base + "/console/failures")
            down = page.locator('tr[data-destination="pacs"][data-state="down"]')
            down.wait_for(timeout=300_000)  # the live fragment updates itself (every 2 s)
            shown_after = time.monotonic() - started
            expect(down).to_contain_text("no association with pacs")
            waiting = int(down.locator('td[data-label="Waiting"]').inner_text())
            assert waiting >= 1
            expect(page.locator("[data-nowhere]")).to_have_count(0)  # pacs is the default now
            [health] = api.get(f"{base}/api/destinations").json()["destinations"]
            assert (health["name"], health["state"], health["last_success_at"]) == ("pacs", "down", None)
            assert health["waiting"] >= 1 and health["next_attempt_at"] and "no association" in health["last_failure_reason"]
            assert api.get(f"{base}/api/nodes/pacs").json()["health"]["state"] == "down"
            assert api.get(f"{base}/api/status").json()["destinations_down"] == ["pacs"]
            waiting_rows = api.get(f"{base}/api/dead-letters?waiting=true").json()
            assert waiting_rows and {r["status"] for r in waiting_rows} <= {"pending", "retrying"}
            # The CLI says the same: `studies` flags the first study, `ae list` shows pacs DOWN and why.
            studies = cli(site, "studies")
            assert "done (undelivered)" in studies and f"{first}: UNDELIVERED: results went nowhere" in studies
            listed = cli(site, "ae", "list")
            assert re.search(r"^pacs +DOWN +- +\S+ \S+ +\d+ +0 ", listed, re.M) and "no association with pacs" in listed, listed
            shots(page, pages, "failures-pacs-down")
            page.goto(base + "/console/")
            expect(page.locator('tr[data-destination="pacs"]')).to_contain_text("down")
            shots(page, pages, "dashboard-pacs-down")
            page.goto(base + "/console/nodes")
            expect(page.locator('table.health tr[data-destination="pacs"]')).to_contain_text("down")
            shots(page, pages, "nodes-pacs-down")

            # ---- the PACS comes back: the waiting objects go, it shows ok ---------------------------------
            pacs = StoreScp(tmp_path / "pacs-in", ae_title="PACS", port=pacs_port, extra=("-dhl",)).start()
            page.goto(base + "/console/failures")
            page.locator('tr[data-destination="pacs"][data-state="ok"]').wait_for(timeout=120_000)
            expect(page.locator('tr[data-destination="pacs"] td[data-label="Waiting"]')).to_have_text("0")
            assert any(pacs.output_dir.iterdir()), "the PACS received nothing once it was back"
            assert not errors, errors
            browser.close()
        print(f"PACS down shown on the failures page {shown_after:.1f} s after the push")
    finally:
        site.stop()
        if pacs is not None:
            pacs.stop()
