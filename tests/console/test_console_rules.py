"""The console's routing-rules page in a real browser (Debian chromium via playwright) against a real
``anatomix-node serve`` with its HTTP port on (issue 11: "routing rules: edit with validation and the
dry run against a recent study").

An admin adds a rule with a broken modality glob and sees the API's error next to the Modality field,
fixes it, saves it; adds a second rule and moves it up; the dry run on a study seeded through the
store names the matching rule and its destination. A viewer sees the list and the dry run but no
edit control, and the edit page answers 403. axe-core: no serious/critical violation; screenshot in
test-output/console-rules.png.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest
from pydicom.uid import generate_uid

from dicom_node.settings import load_settings
from dicom_node.store.base import RemoteNode
from tests.integration.test_delivery import seed_study
from tests.support.api import api_node, http_url, make_accounts, wait_for_http
from tests.support.console_browser import axe_violations, install_axe, launch

pytestmark = pytest.mark.timeout(600)


def login(page, base: str, user: str, password: str) -> None:
    page.goto(base + "/console/rules")
    assert "/console/login" in page.url
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(lambda url: urlparse(url).path == "/console/rules")


def rule_names(page) -> list[str]:
    return page.locator("tr[data-rule]").evaluate_all("rows => rows.map(r => r.dataset.rule)")


def no_serious_violations(page, axe: Path, what: str) -> None:
    problems = axe_violations(page, axe)
    assert not problems, f"{what}: axe-core found serious/critical violations: {problems}"


def test_console_routing_rules_edit_move_dry_run_in_chromium(tmp_path: Path, output_dir: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    axe = install_axe()
    node = api_node(tmp_path / "node")
    node.write_config()
    store = node.open_store()
    study_uid = generate_uid()
    try:
        store.add_remote_node(RemoteNode("pacs", "PACS", "127.0.0.1", 11112, role="destination", profile="sr-only"))
        store.add_remote_node(RemoteNode("archive", "ARCHIVE", "127.0.0.1", 11113, role="destination"))
        store.add_remote_node(RemoteNode("modality", "MODALITY", "127.0.0.1", 104, role="source"))
        seed_study(store, load_settings(node.config_path), study_uid, 0)  # calling AE MODALITY, no header on disk
    finally:
        store.close()
    accounts = make_accounts(node, ("viewer", "admin"))
    base = http_url(node)
    node.start()
    try:
        wait_for_http(node)
        with sync_playwright() as playwright:
            browser = launch(playwright)
            page = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True).new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            login(page, base, "admin", accounts.passwords["admin"])
            expect(page.get_by_role("link", name="Routing rules")).to_have_attribute("aria-current", "page")
            expect(page.locator("tbody")).to_contain_text("No routing rule")

            # ---- add: a broken glob first, the error next to the Modality field; then fixed -----------------
            page.get_by_role("link", name="Add a routing rule").click()
            page.wait_for_url("**/console/rules/new")
            page.get_by_label("Name").fill("dx-to-archive")
            page.get_by_label("Modality").fill("CR, [DX")
            page.get_by_label("archive (ARCHIVE)").check()
            page.get_by_role("button", name="Add").click()
            modality_error = page.locator("#match-modality-error")
            expect(modality_error).to_contain_text("never closed")  # the API's message for match.modality[1]
            expect(page.get_by_label("Modality")).to_have_attribute("aria-invalid", "true")
            expect(page.get_by_label("Modality")).to_be_focused()
            assert page.locator("#name-error").inner_text() == ""
            assert page.locator("#action-destinations-error").inner_text() == ""
            assert page.locator("[data-form-error]").is_hidden()
            no_serious_violations(page, axe, "rule form with an error")
            page.screenshot(path=str(output_dir / "console-rule-form-error.png"), full_page=True)
            # a rule sending nowhere: the error lands next to the destinations
            page.get_by_label("Modality").fill("CR, DX")
            page.get_by_label("archive (ARCHIVE)").uncheck()
            page.get_by_role("button", name="Add").click()
            expect(page.locator("#action-destinations-error")).to_contain_text("sends results nowhere")
            assert page.locator("#match-modality-error").inner_text() == ""
            page.get_by_label("archive (ARCHIVE)").check()
            page.get_by_role("button", name="Add").click()
            page.wait_for_url(lambda url: urlparse(url).path == "/console/rules")
            row = page.locator('tr[data-rule="dx-to-archive"]')
            expect(row).to_contain_text("Modality: CR, DX")
            expect(row).to_contain_text("archive")

            # ---- a second rule, with a profile; moved above the first ----------------------------------------
            page.get_by_role("link", name="Add a routing rule").click()
            page.get_by_label("Name").fill("from-modality")
            page.get_by_label("Description").fill("everything the ward's modality sends")
            page.get_by_label("Calling AE title").fill("MODAL*")
            page.get_by_label("pacs (PACS)").check()
            page.get_by_label("Output profile").select_option("sr-only")
            page.get_by_role("button", name="Add").click()
            page.wait_for_url(lambda url: urlparse(url).path == "/console/rules")
            assert rule_names(page) == ["dx-to-archive", "from-modality"]
            page.get_by_role("button", name="Move from-modality up").focus()
            page.keyboard.press("Enter")  # keyboard works: a real button
            page.wait_for_function("() => document.querySelector('tr[data-rule]').dataset.rule === 'from-modality'")
            assert rule_names(page) == ["from-modality", "dx-to-archive"]
            expect(page.locator('tr[data-rule="from-modality"] td').first).to_have_text("1")
            expect(page.locator('tr[data-rule="from-modality"]')).to_contain_text("sr-only")

            # ---- edit keeps the values; a change is saved ---------------------------------------------------
            page.get_by_role("link", name="Edit dx-to-archive").click()
            expect(page.get_by_label("Modality")).to_have_value("CR, DX")
            expect(page.get_by_label("archive (ARCHIVE)")).to_be_checked()
            page.get_by_label("Enabled").uncheck()
            page.get_by_role("button", name="Save").click()
            page.wait_for_url(lambda url: urlparse(url).path == "/console/rules")
            expect(page.locator('tr[data-rule="dx-to-archive"] td').nth(2)).to_have_text("no")

            # ---- dry run on the seeded study (the latest: the default) ---------------------------------------
            expect(page.get_by_label("Study Instance UID (empty: the latest study)")).to_have_value(study_uid)
            page.get_by_role("button", name="Dry run").click()
            result = page.locator("[data-dry-run-result]")
            expect(result).to_be_visible()
            expect(result.locator("[data-explanation]")).to_contain_text("rule 1 from-modality: MATCHED")
            expect(result.locator("[data-explanation]")).to_contain_text("dx-to-archive")
            expect(result.locator("[data-destinations]")).to_contain_text("pacs (profile sr-only)")
            assert result.get_attribute("data-rule") == "from-modality"
            page.get_by_label("Study Instance UID (empty: the latest study)").fill("1.2.3.404")
            page.get_by_role("button", name="Dry run").click()
            expect(page.locator("form[data-dry-run] [data-form-error]")).to_contain_text("no study 1.2.3.404")
            page.get_by_label("Study Instance UID (empty: the latest study)").fill(study_uid)
            page.get_by_role("button", name="Dry run").click()
            expect(result.locator("[data-destinations]")).to_contain_text("pacs")
            no_serious_violations(page, axe, "rules page")
            page.screenshot(path=str(output_dir / "console-rules.png"), full_page=True)

            # ---- delete with confirmation: dismissed keeps it, accepted removes it ----------------------------
            page.once("dialog", lambda dialog: dialog.dismiss())
            page.get_by_role("button", name="Delete dx-to-archive").click()
            expect(page.locator('tr[data-rule="dx-to-archive"]')).to_have_count(1)
            page.once("dialog", lambda dialog: dialog.accept())
            page.get_by_role("button", name="Delete dx-to-archive").click()
            expect(page.locator('tr[data-rule="dx-to-archive"]')).to_have_count(0)
            assert rule_names(page) == ["from-modality"]
            assert not errors, errors

            # ---- a viewer: the list and the dry run, no edit control ---------------------------------------
            viewer = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True).new_page()
            login(viewer, base, "viewer", accounts.passwords["viewer"])
            expect(viewer.locator('tr[data-rule="from-modality"]')).to_contain_text("MODAL*")
            assert viewer.get_by_role("link", name="Add a routing rule").count() == 0
            assert viewer.get_by_role("link", name="Edit from-modality").count() == 0
            assert viewer.locator("main button[data-action]").count() == 0
            viewer.get_by_role("button", name="Dry run").click()
            expect(viewer.locator("[data-dry-run-result] [data-explanation]")).to_contain_text("from-modality: MATCHED")
            no_serious_violations(viewer, axe, "rules page (viewer)")
            response = viewer.goto(base + "/console/rules/from-modality/edit")
            assert response is not None and response.status == 403
            response = viewer.goto(base + "/console/rules/new")
            assert response is not None and response.status == 403
            browser.close()
    finally:
        node.stop()
