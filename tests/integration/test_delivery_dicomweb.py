"""DICOMweb destinations (issue 23) against Orthanc's DICOMweb plugin (Debian orthanc-dicomweb) with
authentication on: HTTP basic (RegisteredUsers) and a bearer token (a Lua request filter), through the
CLI (``ae add --url``, ``echo``, ``ae list``) and the API (in-process, over a real SQLite store).

Results go by STOW-RS and land in the PACS once; a refused credential is a permanent failure (no
retry, the destination's health says why); a per-instance failure is read from the answer's
FailedSOPSequence while the rest of the study is stored; a server that is down, or that never
answers, is transient: retried with backoff, dead-lettered after the window, delivered once it is back.
"""

from __future__ import annotations

import socket
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from dicom_node.api import auth
from dicom_node.cli.main import main
from dicom_node.ops.remotes import destination_health
from dicom_node.pipeline.delivery import deliver_study_version
from dicom_node.pipeline.delivery_dicomweb import http_outcome, outcomes_from_answer
from dicom_node.pipeline.delivery_outcomes import OutgoingObject
from dicom_node.settings import Settings
from dicom_node.store import open_store
from dicom_node.store.base import RemoteNode
from dicom_node.web.app import create_app
from tests.integration.test_delivery import seed_study, to_comprehensive
from tests.support.net import free_port
from tests.support.orthanc import Orthanc

BASIC_USER, BASIC_PASSWORD = "anatomix", "stow-basic-secret"
BEARER_TOKEN = "stow-bearer-token-0123456789"


@pytest.fixture(scope="module")
def pacs_basic(tmp_path_factory):
    orthanc = Orthanc(tmp_path_factory.mktemp("orthanc-basic"), users={BASIC_USER: BASIC_PASSWORD}).start()
    yield orthanc
    orthanc.stop()


@pytest.fixture(scope="module")
def pacs_bearer(tmp_path_factory):
    orthanc = Orthanc(tmp_path_factory.mktemp("orthanc-bearer"), bearer_token=BEARER_TOKEN).start()
    yield orthanc
    orthanc.stop()


def new_site(tmp_path: Path, **delivery: object) -> tuple[Settings, Path]:
    """Settings of a node in tmp_path (SQLite), its config file for the CLI, its store created."""
    values = {"backoff_base_s": 10.0, "backoff_max_s": 60.0, "retry_window_s": 300.0, "timeout_s": 5.0, **delivery}
    database = f"sqlite:///{tmp_path / 'data' / 'anatomix.db'}"
    settings = Settings().with_overrides(storage={"data_dir": tmp_path / "data"}, database={"url": database}, delivery=values)
    config = tmp_path / "anatomix-node.toml"
    lines = [f'[storage]\ndata_dir = "{tmp_path / "data"}"', f'[database]\nurl = "{database}"', "[delivery]"]
    lines += [f"{key} = {value}" for key, value in values.items()]
    config.write_text("\n".join(lines) + "\n")
    open_store(database).close()
    return settings, config


def cli(capsys, config: Path, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([*args, "--config", str(config)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def instances_in(orthanc: Orthanc, study_uid: str) -> set[str]:
    """The SOP Instance UIDs Orthanc holds for a study (its own QIDO-RS)."""
    answer = orthanc.get(f"/dicom-web/studies/{study_uid}/instances")
    return {item["00080018"]["Value"][0] for item in answer} if answer else set()


def test_http_answers_map_onto_the_delivery_outcomes() -> None:
    assert [http_outcome(code) for code in (200, 202, 204)] == ["sent"] * 3
    assert [http_outcome(code) for code in (408, 429, 500, 502, 503, 504)] == ["transient"] * 6
    assert [http_outcome(code) for code in (301, 400, 401, 403, 404, 409, 413, 415)] == ["permanent"] * 8
    node = RemoteNode("web", "", "pacs.example", 443, role="destination", url="https://pacs.example/dicom-web")
    objects = [OutgoingObject(f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.88.11", "text_sr", Path("x")) for i in range(4)]
    body = pydicom.Dataset()
    stored, full, bad = pydicom.Dataset(), pydicom.Dataset(), pydicom.Dataset()
    stored.ReferencedSOPInstanceUID, stored.WarningReason = "1.2.3.0", 0xB000
    full.ReferencedSOPInstanceUID, full.FailureReason = "1.2.3.1", 0xA700
    bad.ReferencedSOPInstanceUID, bad.FailureReason = "1.2.3.2", 0xA900
    body.ReferencedSOPSequence, body.FailedSOPSequence = [stored], [full, bad]
    outcomes = outcomes_from_answer(node, 202, "Accepted", body, objects, [o.sop_class_uid for o in objects])
    assert [(o.outcome, o.status) for o in outcomes] == [("sent", 0xB000), ("transient", 0xA700), ("permanent", 0xA900), ("transient", None)]
    assert "FailureReason 0xA700 (out of resources)" in outcomes[1].error and "does not mention" in outcomes[3].error
    refused = outcomes_from_answer(node, 401, "Unauthorized", None, objects, [o.sop_class_uid for o in objects])
    assert {o.outcome for o in refused} == {"permanent"} and "HTTP 401 Unauthorized: the credentials were refused" in refused[0].error
    assert {o.outcome for o in outcomes_from_answer(node, 503, "Service Unavailable", None, objects, ["x"] * 4)} == {"transient"}


def test_cli_basic_auth_echo_deliver_then_a_refused_password_is_permanent(tmp_path, capsys, pacs_basic) -> None:
    settings, config = new_site(tmp_path)
    secret = tmp_path / "pacs.basic"
    secret.write_text(f"{BASIC_USER}:{BASIC_PASSWORD}\n")
    url = f"{pacs_basic.url}/dicom-web"
    code, out, err = cli(capsys, config, "ae", "add", "pacs-web", "--url", url + "/", "--basic-auth-file", str(secret), "--profile", "sr-only",
                         "--default-destination")  # fmt: skip
    assert code == 0, err
    assert f"added pacs-web: DICOMweb {url}, basic auth (destination, profile sr-only)" in out
    assert "plain http" in err  # a warning: credentials over http
    assert BASIC_PASSWORD not in out + err
    code, out, err = cli(capsys, config, "echo", "pacs-web")
    assert code == 0 and f"pacs-web ({url}): QIDO-RS success" in out and "ms round trip" in out, err

    store = open_store(settings.database_url)
    try:
        study_uid = generate_uid()
        objects = seed_study(store, settings, study_uid, 2)
        delivered = deliver_study_version(store, settings, store.get_study(study_uid), fallback=to_comprehensive)
        assert (delivered.sent, delivered.finished) == (2, True)
        assert instances_in(pacs_basic, study_uid) == {o.sop_instance_uid for o in objects}
        code, out, _ = cli(capsys, config, "ae", "list")
        assert "DICOMweb " + url in out and any(line.startswith("pacs-web ") and " ok " in line for line in out.splitlines())

        secret.write_text(f"{BASIC_USER}:not-the-password\n")  # read at each attempt: no restart needed
        refused_uid = generate_uid()
        refused_objects = seed_study(store, settings, refused_uid, 2)
        refused = deliver_study_version(store, settings, store.get_study(refused_uid), fallback=to_comprehensive)
        assert (refused.sent, refused.failed, refused.retrying, refused.finished) == (0, 2, 0, True)  # permanent: no retry
        rows = store.list_deliveries(refused_uid)
        assert {r.status for r in rows} == {"failed"} and all("HTTP 401" in r.error and "credentials" in r.error for r in rows)
        assert instances_in(pacs_basic, refused_uid) == set()
        [health] = [h for h in store.list_destination_health() if h.destination == "pacs-web"]
        assert health.last_failure_reason and "HTTP 401" in health.last_failure_reason and health.last_success_at is not None
    finally:
        store.close()
    code, _, err = cli(capsys, config, "echo", "pacs-web")
    assert code == 2 and "QIDO-RS answered HTTP 401" in err and "credentials were refused" in err
    secret.write_text(f"{BASIC_USER}:{BASIC_PASSWORD}\n")  # the admin fixes the password and re-sends by hand
    code, out, err = cli(capsys, config, "resend", refused_uid, "--to", "pacs-web")
    assert code == 0, out + err
    assert instances_in(pacs_basic, refused_uid) == {o.sop_instance_uid for o in refused_objects}
    with pytest.raises(SystemExit):  # argparse: one kind of credentials
        cli(capsys, config, "ae", "add", "bad", "--url", url, "--auth-token-file", str(secret), "--basic-auth-file", str(secret))
    assert "not allowed with argument" in capsys.readouterr().err


def test_bearer_token_and_a_per_instance_failure_from_the_answer(tmp_path, capsys, pacs_bearer) -> None:
    settings, config = new_site(tmp_path)
    token = tmp_path / "pacs.token"
    token.write_text(BEARER_TOKEN + "\n")
    url = f"{pacs_bearer.url}/dicom-web"
    assert cli(capsys, config, "ae", "add", "pacs-web", "--url", url, "--auth-token-file", str(token), "--profile", "sr-only",
               "--default-destination")[0] == 0  # fmt: skip
    code, out, err = cli(capsys, config, "echo", "pacs-web")
    assert code == 0 and "QIDO-RS success" in out, err
    store = open_store(settings.database_url)
    try:
        study_uid = generate_uid()
        objects = seed_study(store, settings, study_uid, 3)
        stray = pydicom.dcmread(objects[2].path)
        stray.StudyInstanceUID = generate_uid()  # an object of another study in this study's request: refused alone
        stray.save_as(objects[2].path)
        first = deliver_study_version(store, settings, store.get_study(study_uid), fallback=to_comprehensive)
        assert (first.sent, first.failed, first.retrying) == (2, 1, 0)
        rows = {r.sop_instance_uid: r for r in store.list_deliveries(study_uid)}
        assert rows[objects[2].sop_instance_uid].status == "failed" and rows[objects[2].sop_instance_uid].last_status == 0x0110
        assert "FailureReason 0x0110 (processing failure)" in rows[objects[2].sop_instance_uid].error
        assert instances_in(pacs_bearer, study_uid) == {objects[0].sop_instance_uid, objects[1].sop_instance_uid}
    finally:
        store.close()
    token.write_text("a-revoked-token\n")
    code, _, err = cli(capsys, config, "echo", "pacs-web")
    assert code == 2 and "HTTP 403" in err and "a-revoked-token" not in err


def test_down_or_silent_server_is_transient_dead_letters_after_the_window_and_is_delivered_once_back(tmp_path, capsys) -> None:
    settings, config = new_site(tmp_path, timeout_s=1.0)
    port = free_port()
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections (the kernel's backlog) and never answers
    store = open_store(settings.database_url)
    pacs = Orthanc(tmp_path / "orthanc", http_port=port, users={BASIC_USER: BASIC_PASSWORD})
    try:
        secret = tmp_path / "pacs.basic"
        secret.write_text(f"{BASIC_USER}:{BASIC_PASSWORD}\n")
        for name, target in (("down", port), ("silent", silent.getsockname()[1])):
            assert cli(capsys, config, "ae", "add", name, "--url", f"http://127.0.0.1:{target}/dicom-web", "--basic-auth-file", str(secret),
                       "--profile", "sr-only", "--default-destination")[0] == 0  # fmt: skip
        code, _, err = cli(capsys, config, "echo", "down", "--timeout", "1")
        assert code == 2 and "cannot connect" in err
        code, _, err = cli(capsys, config, "echo", "silent", "--timeout", "1")
        assert code == 2 and "no answer within 1 s" in err
        study_uid = generate_uid()
        objects = seed_study(store, settings, study_uid, 2)
        study = store.get_study(study_uid)
        first = deliver_study_version(store, settings, study, fallback=to_comprehensive)
        states = {d.name: d for d in first.destinations}
        assert (states["down"].retrying, states["silent"].retrying, first.finished) == (2, 2, False)
        rows = {(r.destination, r.sop_instance_uid): r for r in store.list_deliveries(study_uid)}
        assert all("cannot connect" in r.error for (d, _), r in rows.items() if d == "down")
        assert all("no answer within 1 s" in r.error for (d, _), r in rows.items() if d == "silent")
        health = {row["name"]: row for row in destination_health(store)}
        assert health["down"]["state"] == "down" and health["down"]["waiting"] == 2

        start = min(r.first_attempt_at for r in rows.values())
        silent_node = store.get_remote_node("silent")
        late = deliver_study_version(store, settings, study, fallback=to_comprehensive, destinations=[silent_node], now=start + timedelta(seconds=301))
        assert late.dead == 2 and all("dead-lettered after 2 attempts" in r.error for r in store.list_deliveries(study_uid) if r.destination == "silent")

        pacs.start()  # the PACS comes back on the same port: the next due try stores each object once
        down_node = store.get_remote_node("down")
        due = max(r.next_attempt_at for r in rows.values() if r.destination == "down")
        back = deliver_study_version(store, settings, study, fallback=to_comprehensive, destinations=[down_node], now=due)
        again = deliver_study_version(store, settings, study, fallback=to_comprehensive, destinations=[down_node], now=due + timedelta(seconds=60))
        assert (back.sent, back.finished, again.sent) == (2, True, 2)
        assert instances_in(pacs, study_uid) == {o.sop_instance_uid for o in objects}
        assert len(pacs.get("/instances")) == 2  # sent once: the second pass sent nothing again
    finally:
        store.close()
        silent.close()
        pacs.stop()


def test_api_keeps_the_secret_in_a_file_of_its_own_and_echoes_by_qido(tmp_path, pacs_basic) -> None:
    settings, _ = new_site(tmp_path)
    store = open_store(settings.database_url)
    password = auth.generate_password()
    store.add_api_user(auth.new_user("admin", "admin", password))
    token = auth.new_secret(auth.TOKEN_PREFIX)
    store.add_api_token("admin", "tests", auth.secret_hash(token), datetime.now(UTC))
    app = create_app(settings, store)
    client = TestClient(app, headers={"Authorization": f"Bearer {token}"})
    browser = TestClient(app)  # the console's session
    try:
        assert browser.post("/api/auth/login", json={"username": "admin", "password": password}).status_code == 200
        url = f"{pacs_basic.url}/dicom-web"
        added = client.post("/api/nodes", json={"name": "pacs-web", "url": url, "basic_auth": f"{BASIC_USER}:{BASIC_PASSWORD}",
                                                "default_destination": True, "basic_auth_file": "/etc/shadow"})  # fmt: skip
        assert added.status_code == 201, added.text
        shown = added.json()
        assert (shown["url"], shown["auth"], shown["ae_title"], shown["port"]) == (url, "basic", "", pacs_basic.http_port)
        assert BASIC_PASSWORD not in added.text and "basic_auth_file" not in shown
        kept = Path(store.get_remote_node("pacs-web").basic_auth_file)
        assert kept.parent == settings.storage.data_dir / "dicomweb" and stat.S_IMODE(kept.stat().st_mode) == 0o600
        echo = client.post("/api/nodes/pacs-web/echo", json={}).json()
        assert echo["success"] and echo["rtt_ms"] > 0, echo
        assert client.patch("/api/nodes/pacs-web", json={"basic_auth": f"{BASIC_USER}:wrong"}).status_code == 200
        refused = client.post("/api/nodes/pacs-web/echo", json={}).json()
        assert not refused["success"] and "HTTP 401" in refused["error"]
        bad = client.post("/api/nodes", json={"name": "bad-url", "url": "ftp://pacs.example/dicom-web"})
        assert bad.status_code == 422 and bad.json()["errors"][0]["where"] == "body.url"
        bad_ca = client.post("/api/nodes", json={"name": "bad-ca", "url": "https://pacs.example/dicom-web", "ca_pem": "not a certificate"})
        assert bad_ca.status_code == 422 and "holds no PEM CA certificate" in bad_ca.json()["detail"]
        no_url = client.post("/api/nodes", json={"name": "no-url", "ae_title": "X", "host": "h", "port": 104, "auth_token": "t"})
        assert no_url.status_code == 422 and no_url.json()["errors"][0]["where"] == "body.auth_token"
        traversal = client.post("/api/nodes", json={"name": "../escape", "url": url, "auth_token": "t"})
        assert traversal.status_code == 422 and not (settings.storage.data_dir / "escape.token").exists()
        audit = client.get("/api/audit?limit=50").text
        assert BASIC_PASSWORD not in audit and "wrong" not in audit
        console = browser.get("/console/nodes").text
        assert f"DICOMweb</span> {url}" in console and "Echo pacs-web" in console
        form = browser.get("/console/nodes/pacs-web/edit").text
        assert 'name="url"' in form and f'value="{url}"' in form and "(now: basic" in form and BASIC_PASSWORD not in form
    finally:
        client.close()
        browser.close()
        store.close()
