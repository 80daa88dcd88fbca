"""The console's admin pages in a real browser (Debian chromium, headless) at 1366 and 390 px wide
(issue 21): one browser session over the API application served by uvicorn on a real SQLite store,
seeded with a received chest study, its result objects and deliveries (one refused), a source and an
unreachable destination, audit events and accounts. No workers: what is checked is what people see.

A one-time password leads to the password page only, and changing it opens the console; the node
form refuses a 21-character AE title, a backslash and a bad port with the CLI's words, next to the
field; an echo error wraps in its cell; nothing scrolls sideways on a phone; the study date reads as
a date. Each page: a screenshot at both widths in test-output/console-admin-*.png (looked at by a
person) and axe-core without serious or critical violations.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pydicom
import pytest

from dicom_node.api import auth
from dicom_node.audit.trail import AuditTrail, Peer, text_diff, text_digest
from dicom_node.settings import HttpSettings, Settings, StorageSettings
from dicom_node.store import open_store
from dicom_node.store.base import DeliveryRecord, InstanceRecord, ProducedObject, RemoteNode
from dicom_node.web.app import create_app
from tests.support.console_browser import axe_violations, install_axe, launch
from tests.support.net import free_port
from tests.support.workers import make_chest_studies

pytestmark = pytest.mark.timeout(600)

WIDTHS = (1366, 390)


def seed_site(tmp_path: Path, store, settings: Settings) -> tuple[str, str]:
    """A done chest study with a spooled image, two result objects (one refused by the PACS), nodes, audit events."""
    (source,) = make_chest_studies(tmp_path / "in", 1)
    spool = settings.storage.spool_dir
    spool.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, spool / "study.dcm")
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    uid, now = str(ds.StudyInstanceUID), datetime.now(UTC)
    store.record_instance(InstanceRecord(str(ds.SOPInstanceUID), str(ds.SOPClassUID), uid, str(ds.SeriesInstanceUID), "1.2.840.10008.1.2.1",
                                         "study.dcm", 1, "0" * 64, "MODALITY", now - timedelta(seconds=40)), source_node="modality")  # fmt: skip
    for before, after in (("receiving", "stable"), ("stable", "analyzing"), ("analyzing", "delivering"), ("delivering", "done")):
        assert store.transition_study(uid, 1, (before,), after)
    objects = [(kind, f"{uid}.{n}") for n, kind in enumerate(("sr", "seg", "sc"), start=7)]
    results = settings.storage.results_dir / "r"
    results.mkdir(parents=True)
    shutil.copy(source, results / "sc.dcm")  # the preview reads the SC's pixels: the radiograph will do
    for kind, sop in objects:
        store.record_produced_object(ProducedObject(uid, 1, str(ds.SOPInstanceUID), kind, sop, "1.2.840.10008.5.1.4.1.1.88.34", f"r/{kind}.dcm", now))
    store.upsert_delivery(DeliveryRecord(uid, 1, "pacs", objects[0][1], "sent", 1, 0x0000, None, now, now))
    store.upsert_delivery(DeliveryRecord(uid, 1, "pacs", objects[1][1], "sent", 1, 0x0000, None, now, now))
    store.upsert_delivery(DeliveryRecord(uid, 1, "pacs", objects[2][1], "failed", 3, 0xA700, "the PACS is out of resources", now, now))
    store.add_remote_node(RemoteNode("modality", "MODALITY", "*", 104, role="source"))
    closed = free_port()  # nothing listens: the echo fails with the operating system's long reason
    store.add_remote_node(RemoteNode("pacs", "PACS", "127.0.0.1", closed, role="destination", default_destination=True))
    trail = AuditTrail(store)
    trail.record("association_released", Peer("MODALITY", "ANATOMIX", "10.0.0.7"), received=1, studies=[uid])
    trail.record("objects_sent", Peer("PACS", None, "127.0.0.1"), study_instance_uid=uid, sent=[o for _, o in objects[:2]],
                 failed={objects[2][1]: "0xA700 out of resources"}, sop_classes={}, destination="pacs", version=1, port=closed)  # fmt: skip
    old, new = "[node]\nae_title = 'OLD'\n" + "# comment\n" * 300, "[node]\nae_title = 'ANATOMIX'\n" + "# comment\n" * 300
    trail.record("admin_change", Peer(None, None, "host"), user="root", what="settings.init", target="/etc/anatomix/anatomix-node.toml",
                 before=text_digest(old), after=text_digest(new), diff=text_diff(old, new, "anatomix-node.toml"), via="cli")  # fmt: skip
    return uid, str(ds.StudyDate)


class Serve:
    """The API application (console mounted) under uvicorn in a thread."""

    def __init__(self, app, port: int) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.base = f"http://127.0.0.1:{port}"

    def __enter__(self) -> Serve:
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.base + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError("uvicorn did not answer within 30 s")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def test_admin_pages_in_chromium_at_desktop_and_phone_width(tmp_path: Path, output_dir: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    axe = install_axe()
    settings = replace(Settings(), storage=replace(StorageSettings(), data_dir=tmp_path / "data"), http=replace(HttpSettings(), time_zone="Europe/Berlin"))
    settings = replace(settings, delivery=replace(settings.delivery, timeout_s=2.0))
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    admin_password, one_time = auth.generate_password(), auth.generate_password()
    store.add_api_user(auth.new_user("admin1", "admin", admin_password))
    store.add_api_user(auth.new_user("newbie", "viewer", one_time, must_change_password=True))
    uid, study_date = seed_site(tmp_path, store, settings)
    shots: list[str] = []

    def look(page, name: str) -> None:
        """Both widths: no sideways scrolling, a full-page screenshot each; axe-core at desktop width."""
        for width in WIDTHS:
            page.set_viewport_size({"width": width, "height": 900})
            page.wait_for_timeout(50)
            overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{name} at {width} px scrolls sideways by {overflow} px"
            page.screenshot(path=str(output_dir / f"console-admin-{name}-{width}.png"), full_page=True)
        page.set_viewport_size({"width": WIDTHS[0], "height": 900})
        problems = axe_violations(page, axe)
        assert not problems, f"{name}: axe-core found serious/critical violations: {problems}"
        shots.append(name)

    try:
        with Serve(create_app(settings, store), free_port()) as site, sync_playwright() as playwright:
            base = site.base
            browser = launch(playwright)
            page = browser.new_context(viewport={"width": WIDTHS[0], "height": 900}, bypass_csp=True).new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            # ---- an admin -------------------------------------------------------------------------------
            page.goto(base + "/console/")
            page.get_by_label("User name").fill("admin1")
            page.get_by_label("Password").fill(admin_password)
            page.get_by_role("button", name="Log in").click()
            page.wait_for_url(lambda url: urlparse(url).path == "/console/")

            # ---- nodes: no echo for a source, an echo error wraps ----------------------------------------
            page.goto(base + "/console/nodes")
            assert page.get_by_role("button", name="Echo modality").count() == 0
            row = page.locator('tr[data-node="pacs"]')
            row.get_by_role("button", name="Echo pacs").click()
            expect(row.locator("[data-result]")).to_contain_text("Echo failed", timeout=20_000)
            look(page, "nodes")

            # ---- studies and a study: dates as dates, deliveries by kind, nothing sideways on a phone ----
            page.goto(base + "/console/studies")
            expect(page.locator(f'tr[data-study="{uid}"]')).to_contain_text(f"{study_date[:4]}-{study_date[4:6]}-{study_date[6:]}")
            look(page, "studies")
            page.goto(base + f"/console/studies/{uid}")
            expect(page.locator("#h-deliveries + ul + .table-wrap")).to_contain_text("refused: out of resources (0xA700)")
            expect(page.locator("#h-deliveries + ul + .table-wrap")).to_contain_text("Overlay image SC")
            look(page, "study")

            # ---- dashboard, audit (one event opened), accounts ------------------------------------------------
            page.goto(base + "/console/")
            expect(page.locator("svg.chart").first).to_contain_text("studies")
            look(page, "dashboard")
            page.goto(base + "/console/audit")
            page.locator('li[data-audit="admin_change"] summary').click()
            expect(page.locator('li[data-audit="admin_change"] dl')).to_contain_text("+ae_title = 'ANATOMIX'")
            look(page, "audit")
            page.goto(base + "/console/accounts")
            page.get_by_label("Name").fill("carol")
            page.get_by_role("button", name="Add account").click()
            expect(page.locator("[data-secret]")).to_contain_text("One-time password, shown only now")
            assert store.get_api_user("carol").must_change_password
            page.reload()
            expect(page.locator('tr[data-user="carol"]')).to_contain_text("one-time password, not yet changed")
            look(page, "accounts")

            # ---- the node form refuses what the CLI refuses, in its words ---------------------------------
            page.goto(base + "/console/nodes/new")
            page.get_by_label("Name").fill("archive")
            page.get_by_label("AE title").fill("HOSPITAL_PACS_ARCHIVE")
            assert page.get_by_label("AE title").input_value() == "HOSPITAL_PACS_ARCHIVE"  # nothing cut off while typing
            page.get_by_label("Host").fill("127.0.0.1")
            page.get_by_label("Port").fill("11112")
            page.get_by_label("Role").select_option("destination")
            page.get_by_role("button", name="Add").click()
            ae_error = page.locator("#ae_title-error")
            expect(ae_error).to_contain_text("21 characters, at most 16")
            expect(page.get_by_label("AE title")).to_have_attribute("aria-invalid", "true")
            look(page, "node-form-error")
            page.get_by_label("AE title").fill("PACS\\ARCHIVE")
            page.get_by_role("button", name="Add").click()
            expect(ae_error).to_contain_text("a backslash is not allowed")
            assert "pattern" not in ae_error.inner_text()
            page.get_by_label("AE title").fill("ARCHIVE")
            page.get_by_label("Port").fill("eleven")
            page.get_by_role("button", name="Add").click()
            expect(page.locator("#port-error")).to_contain_text("not a number; give the DICOM port, 1-65535")
            assert page.locator("#ae_title-error").inner_text() == ""
            assert store.get_remote_node("archive") is None

            # ---- a one-time password opens only the password page; changed, the console opens -----------
            page.get_by_role("button", name="Log out").click()
            page.wait_for_url(lambda url: urlparse(url).path == "/console/login")
            page.get_by_label("User name").fill("newbie")
            page.get_by_label("Password").fill(one_time)
            page.get_by_role("button", name="Log in").click()
            page.wait_for_url(lambda url: urlparse(url).path == "/console/account")
            expect(page.locator("[data-first-login]")).to_contain_text("one-time password")
            look(page, "account-first-login")
            page.goto(base + "/console/studies")
            assert urlparse(page.url).path == "/console/account"
            page.get_by_label("Current password").fill(one_time)
            page.get_by_label("New password (at least").fill("my own long password")
            page.get_by_label("New password again").fill("my own long passwort")
            page.get_by_role("button", name="Change password").click()
            expect(page.locator("#repeat_password-error")).to_contain_text("differ")
            page.get_by_label("New password again").fill("my own long password")
            page.get_by_role("button", name="Change password").click()
            page.wait_for_url(lambda url: urlparse(url).path == "/console/")
            assert not store.get_api_user("newbie").must_change_password
            page.get_by_role("link", name="Your account: newbie (viewer)").click()
            page.get_by_label("Label of a new token").fill("monitoring")
            page.get_by_role("button", name="Create token").click()
            expect(page.locator("[data-secret]")).to_contain_text('Token "monitoring", shown only now')
            assert [t.label for t in store.list_api_tokens("newbie")] == ["monitoring"]
            look(page, "account")

            assert page.request.get(base + "/favicon.ico").status == 200
            assert not errors, errors
            browser.close()
    finally:
        store.close()
    assert shots == ["nodes", "studies", "study", "dashboard", "audit", "accounts", "node-form-error", "account-first-login", "account"]
