"""The web console in a real browser (Debian chromium, headless, via playwright) against a real
``anatomix-node serve`` (embedded workers, demo weights) with its HTTP port on, a real DCMTK storescp
as the destination and DCMTK storescu as the modality (issue 11).

One scenario, in the order a new site would live it: log in; add the destination (first with a
bad port: the error shows next to the field); Echo it; push a study and watch the studies list move
it to done without a reload; open it and see the burned-in overlay; stop the destination, push a
second study, see its delivery under Failures; start the destination again, press Resend, see it
delivered. A viewer sees no operator buttons, gets the "your role may not do this" page, and a
forced API call answers 403. Every page: a screenshot in test-output/console-*.png and axe-core
with no serious or critical violation.
"""

from __future__ import annotations

import io
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image

from dicom_node.api import auth
from dicom_node.store.base import RemoteNode
from tests.support.console_browser import axe_violations, install_axe, launch
from tests.support.dcmtk import StoreScp
from tests.support.net import free_port
from tests.support.workers import NodeSite, make_chest_studies, storescu

pytestmark = pytest.mark.timeout(1200)


def wait_http(url: str, site: NodeSite, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        site.check_alive()
        time.sleep(0.3)
    raise AssertionError(f"the HTTP API did not answer\n{site.logs()}")


class Pages:
    """Screenshots and the accessibility check for every page the scenario visits."""

    def __init__(self, output_dir: Path, axe: Path) -> None:
        self.output_dir, self.axe = output_dir, axe
        self.checked: list[str] = []

    def check(self, page, name: str) -> None:
        page.screenshot(path=str(self.output_dir / f"console-{name}.png"), full_page=True)
        problems = axe_violations(page, self.axe)
        assert not problems, f"{name}: axe-core found serious/critical violations: {problems}"
        self.checked.append(name)


def login(page, base: str, user: str, password: str, pages: Pages | None = None) -> None:
    page.goto(base + "/console/studies")
    assert "/console/login" in page.url  # not logged in: the login page, with the way back
    if pages:
        pages.check(page, "login")
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Log in").click()
    page.get_by_text("wrong user name or password").wait_for()
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(lambda url: urlparse(url).path == "/console/studies")


def coloured_fraction(png: bytes) -> float:
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return float(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).mean())


def test_console_scenario_in_chromium(tmp_path: Path, output_dir: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    axe = install_axe()
    http_port = free_port()
    site = NodeSite(tmp_path / "site", overrides={
        "http": {"port": http_port, "time_zone": "Europe/Berlin"},
        "delivery": {"max_attempts": 2, "backoff_base_s": 0.5, "backoff_max_s": 1.0, "timeout_s": 5.0},
    })  # fmt: skip
    site.add_remote(RemoteNode("modality", "MODALITY", "127.0.0.1", 104, role="source"))
    passwords = {}
    store = site.store()
    try:
        for role in ("viewer", "admin"):
            passwords[role] = auth.generate_password()
            store.add_api_user(auth.new_user(f"{role}1", role, passwords[role]))
    finally:
        store.close()
    pacs = StoreScp(tmp_path / "pacs-in", ae_title="PACS").start()
    files = make_chest_studies(tmp_path / "studies", 2)
    first, second = (str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in files)
    base = f"http://127.0.0.1:{http_port}"
    pages = Pages(output_dir, axe)
    try:
        site.serve()
        wait_http(base, site)
        with sync_playwright() as playwright:
            browser = launch(playwright)
            context = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            login(page, base, "admin1", passwords["admin"], pages)

            # ---- remote nodes: add with a validation error first, then echo ----------------------------
            page.get_by_role("link", name="Remote nodes").click()
            page.get_by_role("link", name="Add a remote node").click()
            page.get_by_label("Name").fill("pacs")
            page.get_by_label("AE title").fill("PACS")
            page.get_by_label("Host").fill("127.0.0.1")
            page.get_by_label("Port").fill("70000")
            page.get_by_label("Role").select_option("destination")
            page.get_by_label("Default destination").check()
            page.get_by_role("button", name="Add").click()
            port_error = page.locator("#port-error")
            expect(port_error).to_contain_text("65535")  # next to the port field, from the API's validation
            expect(page.get_by_label("Port")).to_have_attribute("aria-invalid", "true")
            assert page.locator("#name-error").inner_text() == ""
            pages.check(page, "node-form-error")
            page.get_by_label("Port").fill(str(pacs.port))
            page.get_by_role("button", name="Add").click()
            page.wait_for_url("**/console/nodes")
            row = page.locator('tr[data-node="pacs"]')
            expect(row).to_contain_text("PACS")
            row.get_by_role("button", name="Echo pacs").click()
            expect(row.locator("[data-result]")).to_contain_text("Echo OK", timeout=30_000)
            assert " ms" in row.locator("[data-result]").inner_text()
            pages.check(page, "nodes")

            # ---- a study arrives and moves to done while the page stays open ------------------------------
            page.get_by_role("link", name="Studies").click()
            page.evaluate("window.__notReloaded = true")
            storescu(site.port, site.ae_title, files[:1])
            done = page.locator(f'tr[data-study="{first}"] .state-done')
            page.locator(f'tr[data-study="{first}"]').wait_for(timeout=60_000)
            done.wait_for(timeout=300_000)
            assert page.evaluate("window.__notReloaded === true"), "the studies list reloaded the page instead of updating itself"
            first_row = page.locator(f'tr[data-study="{first}"]')
            expect(first_row).to_contain_text("ACC0000")  # accession from the spooled header
            expect(first_row).to_contain_text("1 / 0")  # images analysed / skipped
            assert first_row.locator(".uid").get_attribute("title") == first  # shortened, the whole UID on hover
            expect(first_row).to_contain_text("CET")  # times in the site's zone (Europe/Berlin in November)
            pages.check(page, "studies")
            page.set_viewport_size({"width": 420, "height": 900})
            page.screenshot(path=str(output_dir / "console-studies-narrow.png"), full_page=True)
            page.set_viewport_size({"width": 1280, "height": 900})

            # ---- the study page: overlay, deliveries ---------------------------------------------------
            first_row.get_by_role("link").first.click()
            page.wait_for_url(f"**/console/studies/{first}")
            preview = page.locator("img.preview")
            preview.wait_for()
            assert page.evaluate("document.querySelector('img.preview').complete && document.querySelector('img.preview').naturalWidth > 100")
            png = page.request.get(base + f"/console/studies/{first}/preview.png").body()
            assert coloured_fraction(png) > 0.001, "the preview shows no coloured overlay"
            expect(page.locator("[data-deliveries]")).to_contain_text("pacs:")
            expect(page.get_by_role("button", name="Resend results")).to_be_visible()
            expect(page.get_by_role("button", name="Reanalyse")).to_be_visible()
            pages.check(page, "study")

            # ---- the destination goes down: a failure; it comes back: resend ----------------------------------
            pacs.stop()
            storescu(site.port, site.ae_title, files[1:])
            page.get_by_role("link", name="Failures").click()
            page.evaluate("window.__notReloaded = true")
            failure = page.locator(f'tr[data-failure="{second}"]')
            failure.wait_for(timeout=300_000)
            assert page.evaluate("window.__notReloaded === true")
            expect(failure).to_contain_text("pacs")
            pages.check(page, "failures")
            pacs = StoreScp(tmp_path / "pacs-in-2", ae_title="PACS", port=pacs.port).start()
            failure.get_by_role("button", name=f"Resend {second} to pacs").click()
            expect(page.locator("main > [data-result]")).to_contain_text("sent", timeout=60_000)
            # The list reloaded before the outcome showed: it never still lists what was just sent (issue 21).
            expect(page.locator(f'tr[data-failure="{second}"]')).to_have_count(0, timeout=500)
            page.goto(base + f"/console/studies/{second}")
            delivered = page.locator("[data-deliveries]")
            expect(delivered).to_contain_text("pacs:", timeout=60_000)
            page.wait_for_function(
                "() => { const t = document.querySelector('[data-deliveries]').innerText; "
                "const m = t.match(/(\\d+)\\/(\\d+) sent/); return m && m[1] === m[2]; }",
                timeout=120_000,
            )
            assert any((tmp_path / "pacs-in-2").iterdir()), "the destination received nothing after the resend"
            page.goto(base + "/console/failures")
            expect(page.locator(f'tr[data-failure="{second}"]')).to_have_count(0)

            # ---- dashboard and audit -------------------------------------------------------------------
            page.goto(base + "/console/")
            expect(page.locator("[data-demo]")).to_contain_text("DEMO")
            expect(page.locator("svg.chart").first).to_be_visible()
            pages.check(page, "dashboard")
            page.goto(base + "/console/audit?event=api_change")
            expect(page.locator('li[data-audit="api_change"]').filter(has_text="Remote node added: pacs")).to_have_count(1)
            expect(page.get_by_role("link", name="Export (JSON lines)")).to_be_visible()
            pages.check(page, "audit")
            assert not errors, errors

            # ---- a viewer: no operator buttons, the refusal page, a forced call answers 403 ------------------
            viewer = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True).new_page()
            login(viewer, base, "viewer1", passwords["viewer"])
            viewer.goto(base + f"/console/studies/{first}")
            expect(viewer.locator("[data-deliveries]")).to_contain_text("pacs:")
            assert viewer.get_by_role("button", name="Resend results").count() == 0
            assert viewer.get_by_role("button", name="Reanalyse").count() == 0
            forced = viewer.evaluate(
                """async (uid) => (await fetch(`/api/studies/${uid}/resend`, {method: 'POST', credentials: 'same-origin',
                   headers: {'Content-Type': 'application/json', 'X-CSRF-Token': document.querySelector('meta[name=csrf-token]').content},
                   body: '{}'})).status""",
                first,
            )
            assert forced == 403
            viewer.goto(base + "/console/nodes")
            assert viewer.get_by_role("button", name="Echo pacs").count() == 0
            assert viewer.get_by_role("link", name="Add a remote node").count() == 0
            response = viewer.goto(base + "/console/nodes/new")
            assert response is not None and response.status == 403
            expect(viewer.get_by_role("heading", name="Your role may not do this")).to_be_visible()
            pages.check(viewer, "forbidden")
            viewer.get_by_role("button", name="Log out").click()
            viewer.wait_for_url(lambda url: urlparse(url).path == "/console/login")
            viewer.goto(base + "/console/")
            assert "/console/login" in viewer.url
            browser.close()
        assert pages.checked == ["login", "node-form-error", "nodes", "studies", "study", "failures", "dashboard", "audit", "forbidden"]
    finally:
        site.stop()
        pacs.stop()
