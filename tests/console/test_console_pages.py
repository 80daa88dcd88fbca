"""The console's server side without a browser: the API application (console mounted) over a real
SQLite store, reached in-process with FastAPI's TestClient and a real login. Keyset paging of the
studies page, roles, the site's time zone, shortened UIDs."""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dicom_node.api import auth
from dicom_node.console.views import short_uid
from dicom_node.settings import HttpSettings, Settings, SettingsError, StorageSettings, load_settings
from dicom_node.store import open_store
from dicom_node.store.base import AnalysisRecord, InstanceRecord, RemoteNode
from dicom_node.web.app import create_app

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def seed(store, db: Path, count: int, same_time_every: int = 3) -> list[str]:
    """``count`` studies; every ``same_time_every`` share one created_at (keyset ties on the UID)."""
    uids = []
    for i in range(count):
        uid = f"1.2.826.0.1.3680043.10.1431.{i:05d}"
        at = T0 + timedelta(minutes=i // same_time_every)
        store.record_instance(InstanceRecord(
            sop_instance_uid=f"{uid}.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.1", study_instance_uid=uid, series_instance_uid=f"{uid}.9",
            transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"x/{i}.dcm", size=10, sha256=f"{i:064x}", calling_ae="MOD" if i % 2 else "OTHER",
            received_at=at,
        ))  # fmt: skip
        uids.append(uid)
    with sqlite3.connect(db) as conn:  # the store stamps created_at with the clock: set the test's times
        for i, uid in enumerate(uids):
            at = store._db_time(T0 + timedelta(minutes=i // same_time_every))
            conn.execute("UPDATE studies SET created_at = ?, last_received_at = ? WHERE study_instance_uid = ?", (at, at, uid))
    return uids


@pytest.fixture
def app_and_store(tmp_path: Path):
    settings = replace(Settings(), storage=replace(StorageSettings(), data_dir=tmp_path), http=replace(HttpSettings(), time_zone="America/New_York"))
    db = tmp_path / "state.db"
    store = open_store(f"sqlite:///{db}")
    passwords = {}
    for role in ("viewer", "operator", "admin"):
        passwords[role] = auth.generate_password()
        store.add_api_user(auth.new_user(role, role, passwords[role]))
    app = create_app(settings, store)
    yield app, store, passwords, db
    store.close()


def logged_in(app, role: str, passwords: dict[str, str]) -> TestClient:
    client = TestClient(app)
    assert client.post("/api/auth/login", json={"username": role, "password": passwords[role]}).status_code == 200
    return client


def test_pages_need_a_session_and_send_to_the_login_with_the_way_back(app_and_store) -> None:
    app, _, _, _ = app_and_store
    client = TestClient(app)
    answer = client.get("/console/studies?state=done", follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/console/login?next=/console/studies%3Fstate%3Ddone"
    login = client.get("/console/login?next=//evil.example/")
    assert 'data-next="/console/"' in login.text  # no open redirect
    assert client.get("/console/static/console.js").status_code == 200


def test_keyset_pages_cover_every_study_once_in_order_with_ties(app_and_store) -> None:
    app, store, passwords, db = app_and_store
    uids = seed(store, db, 130)
    seen: list[str] = []
    before = None
    while True:
        page = store.page_studies(before=before, limit=50)
        seen += [s.study_instance_uid for s in page]
        if len(page) < 50:
            break
        before = (page[-1].created_at, page[-1].study_instance_uid)
    assert seen == sorted(uids, key=lambda u: (uids.index(u) // 3, u), reverse=True)
    assert len(store.page_studies(source="MOD", limit=500)) == 65
    assert [s.study_instance_uid for s in store.page_studies(uid_prefix="1.2.826.0.1.3680043.10.1431.0012", limit=50)] == [
        f"1.2.826.0.1.3680043.10.1431.0012{d}" for d in range(9, -1, -1)
    ]
    assert store.page_studies(uid_prefix="1.2.826.0.1.3680043.10.1431.0012_", limit=50) == []  # _ is not a wildcard

    # The page itself: 50 rows, the next link continues where the page ended, the last page has none.
    client = logged_in(app, "viewer", passwords)
    first = client.get("/console/studies")
    rows = re.findall(r'<tr data-study="([^"]+)"', first.text)
    assert rows == seen[:50]
    link = re.search(r'href="([^"]+)" rel="next"', first.text).group(1).replace("&amp;", "&")
    second = client.get(link)
    assert re.findall(r'<tr data-study="([^"]+)"', second.text) == seen[50:100]
    third = client.get(re.search(r'href="([^"]+)" rel="next"', second.text).group(1).replace("&amp;", "&"))
    assert re.findall(r'<tr data-study="([^"]+)"', third.text) == seen[100:] and 'rel="next"' not in third.text
    assert "not valid" in client.get("/console/studies?before=garbage").text


def test_times_in_the_site_zone_and_uids_shortened_with_the_whole_value_in_title(app_and_store) -> None:
    app, store, passwords, db = app_and_store
    uid = seed(store, db, 1)[0]
    page = logged_in(app, "viewer", passwords).get("/console/studies").text
    assert "2026-11-30 07:00:00 EST" in page  # 12:00 UTC in America/New_York
    assert f'title="{uid}"' in page and f">{short_uid(uid)}<" in page and short_uid(uid) != uid
    assert short_uid("1.2.3") == "1.2.3"


def test_role_pages_and_buttons(app_and_store) -> None:
    app, store, passwords, db = app_and_store
    store.add_remote_node(RemoteNode("pacs", "PACS", "127.0.0.1", 11112, role="destination"))
    uid = seed(store, db, 1)[0]
    viewer, operator, admin = (logged_in(app, r, passwords) for r in ("viewer", "operator", "admin"))
    refused = viewer.get("/console/nodes/new")
    assert refused.status_code == 403 and "Your role may not do this" in refused.text and "admin" in refused.text
    assert operator.get("/console/nodes/pacs/edit").status_code == 403
    assert admin.get("/console/nodes/pacs/edit").status_code == 200
    assert admin.get("/console/nodes/nope/edit").status_code == 404
    nodes = {name: c.get("/console/nodes").text for name, c in (("viewer", viewer), ("operator", operator), ("admin", admin))}
    assert "Echo pacs" not in nodes["viewer"] and "Echo pacs" in nodes["operator"] and "Edit pacs" not in nodes["operator"]
    assert "Delete pacs" in nodes["admin"]
    study = {name: c.get(f"/console/studies/{uid}").text for name, c in (("viewer", viewer), ("operator", operator))}
    assert "Resend results" not in study["viewer"] and "Resend results" in study["operator"]
    assert viewer.get("/console/studies/1.2.3.4").status_code == 404
    assert "Export (JSON lines)" not in viewer.get("/console/audit").text and "Export (JSON lines)" in admin.get("/console/audit").text
    for path in ("/console/", "/console/failures", "/console/audit?since=2026-01-01%2010:00&user=admin", "/console/audit?since=bad"):
        assert viewer.get(path).status_code == 200, path


def test_time_zone_setting_is_validated(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[http]\ntime_zone = "Mars/Olympus"\n')
    with pytest.raises(SettingsError, match="http.time_zone"):
        load_settings(config, env={})
    config.write_text('[http]\ntime_zone = "Europe/Berlin"\n')
    assert load_settings(config, env={}).http.time_zone == "Europe/Berlin"


def test_study_page_shows_a_degenerate_model_text_as_not_usable_never_as_itself(app_and_store) -> None:
    """A repetition loop from the model ("4444...") is what the demo weights write: the study page
    says it is not usable and why, as the DICOM results do, and keeps usable text as it is."""
    app, store, passwords, db = app_and_store
    (uid,) = seed(store, db, 1)
    loop = "4" * 300
    result = {"report": {"findings": loop, "impression": "No acute cardiopulmonary process."},
              "findings": [{"label": "effusion", "text": "no no no no no no no no", "boxes": []}]}  # fmt: skip
    store.save_analysis(AnalysisRecord(uid, 1, f"{uid}.1", "analyzed", json.dumps(result), None, T0))
    page = logged_in(app, "viewer", passwords).get(f"/console/studies/{uid}")
    assert page.status_code == 200
    assert "4444444444" not in page.text and "no no no no" not in page.text
    assert "Findings: model output not usable (repetition loop)" in page.text
    assert "Impression: No acute cardiopulmonary process." in page.text
    assert page.text.count("model output not usable (repetition loop)") == 2


def test_a_demo_study_previews_the_labelled_anatomy_prior_and_a_real_one_the_sc(app_and_store, tmp_path, output_dir) -> None:
    """Demo weights find nothing, so the SC has no box: the console draws the demo's anatomy prior,
    each region labelled, under a banner that says what the boxes are (never as findings)."""
    import io
    import shutil

    import numpy as np
    from PIL import Image

    from sr_writer.colours import REGION_COLOURS
    from tests.support.results import make_result, rg1_source

    app, store, passwords, db = app_and_store
    demo_uid, real_uid = seed(store, db, 2)
    source = rg1_source()
    for i, uid in enumerate((demo_uid, real_uid)):
        (tmp_path / "spool" / "x").mkdir(parents=True, exist_ok=True)
        shutil.copy(source.filename, tmp_path / "spool" / "x" / f"{i}.dcm")
        result = make_result(source, n_findings=0, demo=uid == demo_uid)
        store.save_analysis(AnalysisRecord(uid, 1, f"{uid}.1", "analyzed", result.to_json(), None, T0))
    client = logged_in(app, "viewer", passwords)
    page = client.get(f"/console/studies/{demo_uid}").text
    assert "data-demo-preview" in page and "built-in prior" in page and 'class="preview"' in page
    answer = client.get(f"/console/studies/{demo_uid}/preview.png")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    (output_dir / "console-demo-preview.png").write_bytes(answer.content)
    pixels = np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB"))
    colours = {tuple(c) for c in np.unique(pixels.reshape(-1, 3), axis=0)}
    drawn = [index for index, colour in REGION_COLOURS.items() if colour in colours]
    assert len(drawn) == 36, f"regions without a box on the preview: {sorted(set(REGION_COLOURS) - set(drawn))}"
    assert max(pixels.shape[:2]) <= 1200  # scaled down to about 1024 px, plus the banner rows
    # real weights: the preview is the SC the node delivered (none produced here), never the prior
    assert "data-demo-preview" not in client.get(f"/console/studies/{real_uid}").text
    assert client.get(f"/console/studies/{real_uid}/preview.png").status_code == 404
