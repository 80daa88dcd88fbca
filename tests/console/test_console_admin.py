"""The console's admin side without a browser (issue 21): the audit page in sentences with details
on demand, filters and pages; accounts, the forced change of a one-time password; the dashboard
charts' axes; the smaller readability fixes (dates, delivery kinds and statuses, sources, favicon).
The API application over a real SQLite store, in-process (TestClient), with real logins."""

from __future__ import annotations

import re
from datetime import timedelta
from html import unescape

from fastapi.testclient import TestClient

from dicom_node.api import auth
from dicom_node.audit.trail import AuditTrail, Peer, text_diff, text_digest
from dicom_node.store.base import DeliveryRecord, ProducedObject, RemoteNode
from tests.console.test_console_pages import T0, app_and_store, logged_in, seed  # noqa: F401  (the shared fixture)
from tests.dicom_node.test_store import store, store_url  # noqa: F401 (fixtures: both backends)
from tests.support.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)

UIDS = [f"1.2.826.0.1.3680043.10.1431.7.{i}" for i in range(6)]


def events_on(page: str) -> list[str]:
    return re.findall(r'data-audit="([^"]+)"', page)


def test_audit_page_reads_as_sentences_with_details_on_demand_filters_and_pages(app_and_store) -> None:
    app, store, passwords, db = app_and_store
    (study,) = seed(store, db, 1)
    client = logged_in(app, "viewer", passwords)  # its login is the oldest event
    trail = AuditTrail(store)
    pacs = Peer("PACS", None, "10.0.0.5")
    trail.record("objects_sent", pacs, study_instance_uid=study, sent=UIDS[:5], failed={UIDS[5]: "0xA700 out of resources"},
                 sop_classes={u: "1.2.840.10008.5.1.4.1.1.88.34" for u in UIDS}, destination="pacs", version=1, port=11112)  # fmt: skip
    old_settings, new_settings = "[node]\nae_title = 'OLD'\n" + "# x\n" * 400, "[node]\nae_title = 'NEW'\n" + "# x\n" * 400
    diff = text_diff(old_settings, new_settings, "node.toml")
    trail.record("admin_change", Peer(None, None, "host"), user="root", what="settings.init", target="/etc/anatomix/anatomix-node.toml",
                 before=text_digest(old_settings), after=text_digest(new_settings), diff=diff, via="cli")  # fmt: skip
    trail.record("api_login_failed", Peer(None, None, "10.0.0.9"), user="mallory", reason="wrong password")
    for i in range(55):  # more than a page
        trail.record("association_released", Peer("MODALITY", "ANATOMIX", "10.0.0.7"), received=i, studies=[study])

    page = client.get("/console/audit").text
    assert events_on(page) == ["association_released"] * 50  # newest first, 50 per page
    assert "Association from MODALITY@10.0.0.7 finished: 54 images received in 1 study." in page
    older = unescape(re.search(r'href="([^"]+)" rel="next"', page).group(1))
    second = client.get(older).text
    assert events_on(second) == ["association_released"] * 5 + ["api_login_failed", "admin_change", "objects_sent", "api_login"]
    assert 'rel="next"' not in second and ">Newest<" in second

    sent = client.get("/console/audit?event=objects_sent").text
    line = re.search(r'<div class="audit-line">(.*?)</div>', sent, re.S).group(1)
    assert "5 result objects of the study sent to pacs; 1 not sent (0xA700 out of resources)." in line
    assert not any(uid in line.replace(f'title="{study}"', "") for uid in UIDS)  # no UID in the sentence: a count
    details = re.search(r"<details>(.*?)</details>", sent, re.S).group(1)
    assert "sent (5)" in details and all(uid in details for uid in UIDS[:5])  # the UIDs on demand

    settings = client.get("/console/audit?event=admin_change").text
    assert "Settings file written /etc/anatomix/anatomix-node.toml by root (cli)." in settings
    assert "-ae_title = &#39;OLD&#39;" in settings and "+ae_title = &#39;NEW&#39;" in settings and settings.count("# x") < 5
    assert len(settings) < 30_000

    failed = client.get("/console/audit?user=mallory").text
    assert events_on(failed) == ["api_login_failed"] and "Failed login as mallory from 10.0.0.9: wrong password." in failed
    assert 'class="audit-event problem"' in failed
    assert events_on(client.get("/console/audit?ae=PACS").text) == ["objects_sent"]
    assert events_on(client.get(f"/console/audit?study={study}&event=objects_sent").text) == ["objects_sent"]
    assert events_on(client.get("/console/audit?until=2000-01-01%2000:00").text) == []
    bad = client.get("/console/audit?since=yesterday&before=x")
    assert bad.status_code == 200 and "use a date and time such as" in bad.text


def test_a_one_time_password_must_be_changed_first_and_admins_see_accounts(app_and_store) -> None:
    app, store, passwords, _ = app_and_store
    one_time = auth.generate_password()
    store.add_api_user(auth.new_user("newbie", "operator", one_time, must_change_password=True))
    client = TestClient(app)
    assert client.post("/api/auth/login", json={"username": "newbie", "password": one_time}).status_code == 200
    for path in ("/console/", "/console/studies", "/console/audit"):
        answer = client.get(path, follow_redirects=False)
        assert answer.status_code == 303 and answer.headers["location"] == "/console/account?first=1", path
    account = client.get("/console/account?first=1").text
    assert "You logged in with a one-time password" in account and 'data-api="/api/auth/password"' in account
    assert "Your API tokens" not in account  # nothing else until the password is changed
    store.update_api_user("newbie", password_hash=auth.hash_password("a chosen password!"), must_change_password=False)
    assert TestClient(app).post("/api/auth/login", json={"username": "newbie", "password": "a chosen password!"}).status_code == 200

    viewer, admin = logged_in(app, "viewer", passwords), logged_in(app, "admin", passwords)
    assert viewer.get("/console/studies").status_code == 200 and "Your API tokens" in viewer.get("/console/account").text
    assert viewer.get("/console/accounts").status_code == 403 and ">Accounts<" not in viewer.get("/console/").text
    store.add_api_user(auth.new_user("fresh", "viewer", auth.generate_password(), must_change_password=True))
    accounts = admin.get("/console/accounts").text
    assert re.findall(r'<tr data-user="([^"]+)"', accounts) == ["admin", "fresh", "newbie", "operator", "viewer"]
    fresh = re.search(r'<tr data-user="fresh">(.*?)</tr>', accounts, re.S).group(1)
    assert "one-time password, not yet changed" in fresh and "Reset password of fresh" in fresh


def test_dashboard_charts_have_axes_values_and_units(app_and_store) -> None:
    app, store, passwords, db = app_and_store
    page = logged_in(app, "viewer", passwords).get("/console/").text
    chart = re.search(r'<svg class="chart".*?</svg>', page, re.S).group(0)
    assert ">studies</text>" in chart and "time of day (America/New_York), 5-minute bars" in chart
    assert re.search(r'class="tick"[^>]*>\d\d:\d\d</text>', chart)  # the time under the bars
    assert ">0</text>" in chart and ">1</text>" in chart  # the y axis' ticks
    assert ">seconds</text>" in page


def test_readable_dates_delivery_kinds_and_statuses_sources_and_the_favicon(app_and_store) -> None:
    app, store, passwords, db = app_and_store
    (uid,) = seed(store, db, 1)
    store.add_remote_node(RemoteNode("modality", "MODALITY", "*", 104, role="source"))
    store.add_remote_node(RemoteNode("pacs", "PACS", "127.0.0.1", 11112, role="destination"))
    for kind, n in (("sr", 1), ("sc", 2)):
        store.record_produced_object(ProducedObject(uid, 1, f"{uid}.1", kind, f"{uid}.9{n}", "1.2.840.10008.5.1.4.1.1.7", f"r/{n}.dcm", T0))
    store.upsert_delivery(DeliveryRecord(uid, 1, "pacs", f"{uid}.91", "sent", 1, 0x0000, None, T0))
    store.upsert_delivery(DeliveryRecord(uid, 1, "pacs", f"{uid}.92", "failed", 3, 0xA700, "refused", T0 + timedelta(seconds=5)))
    operator = logged_in(app, "operator", passwords)
    study = operator.get(f"/console/studies/{uid}").text
    deliveries = re.search(r"<h2 id=\"h-deliveries\">.*?</section>", study, re.S).group(0)
    assert "Findings SR" in deliveries and "Overlay image SC" in deliveries
    assert "success (0x0000)" in deliveries and "refused: out of resources (0xA700); refused" in deliveries
    nodes = operator.get("/console/nodes").text
    source_row = re.search(r'<tr data-node="modality">(.*?)</tr>', nodes, re.S).group(1)
    assert "Echo modality" not in source_row and ">104<" not in source_row
    assert "Echo pacs" in nodes and ">11112<" in nodes
    icon = TestClient(app).get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/x-icon" and icon.content[:4] == b"\x00\x00\x01\x00"


def test_study_dates_and_dimse_statuses_in_words() -> None:
    from dicom_node.console.views import dicom_date, dimse_status

    assert dicom_date("20040826") == "2004-08-26" and dicom_date("2004") == "2004" and dicom_date("20041340") == "20041340"
    assert dimse_status(0xA7F1) == "refused: out of resources (0xA7F1)" and dimse_status(None) == ""


def test_audit_pages_newest_first_with_filters_on_both_backends(store) -> None:
    trail = AuditTrail(store)
    for i in range(5):
        trail.record("login" if i % 2 else "logout", Peer("AE" if i == 3 else None, None, "h"), user=f"u{i % 2}")
    everything = store.page_audit_events(limit=10)
    assert [e.id for e in everything] == sorted((e.id for e in everything), reverse=True) and len(everything) == 5
    page = store.page_audit_events(limit=2)
    assert [e.id for e in store.page_audit_events(before_id=page[-1].id, limit=10)] == [e.id for e in everything[2:]]
    assert [e.user for e in store.page_audit_events(events=("login",), limit=10)] == ["u1", "u1"]
    assert len(store.page_audit_events(user="u0", limit=10)) == 3 and len(store.page_audit_events(ae="AE", limit=10)) == 1
    later = everything[0].at + timedelta(seconds=1)
    assert store.page_audit_events(since=later, limit=10) == [] and len(store.page_audit_events(until=later, limit=10)) == 5
