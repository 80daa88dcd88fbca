"""A DICOMweb destination in the console, in a real browser (Debian chromium via playwright) against a
real ``anatomix-node serve`` with its HTTP port on and Orthanc's DICOMweb plugin with HTTP basic
authentication on (issue 23).

An admin adds the destination with an ftp URL first (the error shows next to the URL field), then
the right URL and credentials; the list names it by its URL and its kind of authentication, never
the secret; Echo (a QIDO-RS query) reports the round trip. A wrong password saved through the edit
form makes Echo report the 401 and what to check. axe-core: no serious/critical violation;
screenshots in test-output/console-dicomweb-*.png.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.support.api import api_node, http_url, make_accounts, wait_for_http
from tests.support.console_browser import axe_violations, install_axe, launch
from tests.support.orthanc import Orthanc

pytestmark = pytest.mark.timeout(600)

USER, PASSWORD = "anatomix", "console-dicomweb-secret"


def test_console_adds_a_dicomweb_destination_and_echoes_it_in_chromium(tmp_path: Path, output_dir: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    axe = install_axe()
    pacs = Orthanc(tmp_path / "orthanc", users={USER: PASSWORD}).start()
    node = api_node(tmp_path / "node")
    node.write_config()
    accounts = make_accounts(node, ("admin",))
    base = http_url(node)
    node.start()
    try:
        wait_for_http(node)
        with sync_playwright() as playwright:
            browser = launch(playwright)
            page = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True).new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(base + "/console/nodes/new")
            page.get_by_label("User name").fill("admin")
            page.get_by_label("Password").fill(accounts.passwords["admin"])
            page.get_by_role("button", name="Log in").click()
            page.wait_for_url(lambda url: urlparse(url).path == "/console/nodes/new")

            page.get_by_label("Name").fill("pacs-web")
            page.get_by_label("DICOMweb base URL").fill(f"ftp://127.0.0.1:{pacs.http_port}/dicom-web")
            page.get_by_label("Role").select_option("destination")
            page.get_by_label("Basic authentication, user:password").fill(f"{USER}:{PASSWORD}")
            page.get_by_label("Default destination").check()
            page.get_by_role("button", name="Add").click()
            expect(page.locator("#url-error")).to_contain_text("give the DICOMweb base URL")
            expect(page.get_by_label("DICOMweb base URL")).to_have_attribute("aria-invalid", "true")
            assert page.locator("#name-error").inner_text() == ""
            problems = axe_violations(page, axe)
            assert not problems, problems
            page.screenshot(path=str(output_dir / "console-dicomweb-form-error.png"), full_page=True)

            url = f"{pacs.url}/dicom-web"
            page.get_by_label("DICOMweb base URL").fill(url)
            page.get_by_role("button", name="Add").click()
            page.wait_for_url(lambda url: urlparse(url).path == "/console/nodes")
            row = page.locator('tr[data-node="pacs-web"]')
            expect(row).to_contain_text(url)
            expect(row).to_contain_text("basic auth")
            assert PASSWORD not in page.content()
            row.get_by_role("button", name="Echo pacs-web").click()
            expect(row.locator("[data-result]")).to_contain_text("Echo OK", timeout=30_000)
            assert " ms" in row.locator("[data-result]").inner_text()
            problems = axe_violations(page, axe)
            assert not problems, problems
            page.screenshot(path=str(output_dir / "console-dicomweb-nodes.png"), full_page=True)

            page.get_by_role("link", name="Edit pacs-web").click()
            expect(page.get_by_label("DICOMweb base URL")).to_have_value(url)
            expect(page.get_by_text("now: basic")).to_be_visible()
            page.get_by_label("Basic authentication, user:password").fill(f"{USER}:not-the-password")
            page.get_by_role("button", name="Save").click()
            page.wait_for_url(lambda url: urlparse(url).path == "/console/nodes")
            row.get_by_role("button", name="Echo pacs-web").click()
            expect(row.locator("[data-result]")).to_contain_text("Echo failed", timeout=30_000)
            expect(row.locator("[data-result]")).to_contain_text("HTTP 401")
            page.screenshot(path=str(output_dir / "console-dicomweb-echo-refused.png"), full_page=True)
            assert not errors, errors
            browser.close()
    finally:
        node.stop()
        pacs.stop()
