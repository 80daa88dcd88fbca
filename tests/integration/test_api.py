"""The operations API (issue 10) against a real ``anatomix-node serve`` over real HTTP: every
endpoint, 401 without credentials, 403 per role, validation errors as problem details, sessions
with HttpOnly/SameSite cookies and CSRF, rate-limited and audited failed logins, tokens shown once
and revocable, admin changes audited with before/after, C-ECHO with its round-trip time, studies,
dead letters, resend and reanalyse through the same code as the CLI."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from pydicom.uid import generate_uid

from dicom_node.cli.processes import node_command
from dicom_node.settings import load_settings
from dicom_node.store.base import DeliveryRecord, RemoteNode
from tests.integration.test_delivery import seed_study
from tests.support.api import api_node, client, make_accounts, wait_for_http
from tests.support.node import REPO_ROOT
from tests.support.receivers import StorageReceiver

PROBLEM = "application/problem+json"

#: (method, path, body, least role) of every endpoint that needs an account; paths use names that
#: exist in the fixture where it matters (403 must come before 404/409).
ROLE_TABLE = [
    ("GET", "/api/auth/me", None, "viewer"),
    ("GET", "/api/tokens", None, "viewer"),
    ("GET", "/api/nodes", None, "viewer"),
    ("GET", "/api/nodes/pacs", None, "viewer"),
    ("GET", "/api/studies", None, "viewer"),
    ("GET", "/api/dead-letters", None, "viewer"),
    ("GET", "/api/audit", None, "viewer"),
    ("GET", "/api/model", None, "viewer"),
    ("GET", "/api/status", None, "viewer"),
    ("GET", "/api/profiles", None, "viewer"),
    ("GET", "/api/profiles/full", None, "viewer"),
    ("GET", "/api/profile-references", None, "viewer"),
    ("POST", "/api/nodes/pacs/echo", {"timeout_s": 5}, "operator"),
    ("POST", "/api/studies/1.2.3/resend", {}, "operator"),
    ("POST", "/api/studies/1.2.3/reanalyze", {}, "operator"),
    ("POST", "/api/resend", {"states": ["failed"]}, "operator"),
    ("POST", "/api/reanalyze", {"states": ["failed"]}, "operator"),
    ("GET", "/api/users", None, "admin"),
    ("POST", "/api/users", {"name": "x1", "role": "viewer"}, "admin"),
    ("PATCH", "/api/users/viewer", {"disabled": False}, "admin"),
    ("DELETE", "/api/users/nobody", None, "admin"),
    ("POST", "/api/nodes", {"name": "n1", "ae_title": "N1", "host": "127.0.0.1", "port": 104, "role": "source"}, "admin"),
    ("PATCH", "/api/nodes/modality", {"port": 105}, "admin"),
    ("DELETE", "/api/nodes/nobody", None, "admin"),
    ("GET", "/api/audit/export", None, "admin"),
    ("GET", "/api/routing-rules", None, "viewer"),
    ("GET", "/api/routing-rules/nobody", None, "viewer"),
    ("POST", "/api/routing-rules/dry-run", {}, "viewer"),
    ("POST", "/api/routing-rules", {"name": "r0", "match": {"modality": ["ZZ"]}, "action": {"destinations": ["pacs"]}}, "admin"),
    ("PUT", "/api/routing-rules/nobody", {"name": "nobody", "match": {"modality": ["ZZ"]}, "action": {"destinations": ["pacs"]}}, "admin"),
    ("POST", "/api/routing-rules/nobody/move", {"position": 1}, "admin"),
    ("DELETE", "/api/routing-rules/nobody", None, "admin"),
    ("GET", "/api/nodes/modality/tokens", None, "admin"),
    ("POST", "/api/nodes/modality/tokens", {"label": "role table"}, "admin"),
    ("DELETE", "/api/nodes/modality/tokens/999", None, "admin"),
]
ROLES = ("viewer", "operator", "admin")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    node = api_node(tmp_path_factory.mktemp("api"), settings={"http": {"max_failed_logins": 3, "login_window_s": 60}})
    node.write_config()
    pacs = StorageReceiver("127.0.0.1", "PACS")
    store = node.open_store()
    try:
        store.add_remote_node(RemoteNode("pacs", "PACS", "127.0.0.1", pacs.port, role="destination", profile="sr-only",
                                         default_destination=True))  # fmt: skip
        store.add_remote_node(RemoteNode("modality", "MODALITY", "127.0.0.1", 104, role="source"))
    finally:
        store.close()
    accounts = make_accounts(node)
    node.start()
    wait_for_http(node)
    yield node, accounts, pacs
    node.stop()
    pacs.stop()


def audit_events(node, event: str) -> list:
    store = node.open_store()
    try:
        return store.list_audit_events(event)
    finally:
        store.close()


def assert_problem(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith(PROBLEM), response.headers
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"], body
    for word in words:
        assert word in body["detail"], (word, body)
    return body


def test_health_ready_metrics_and_openapi_answer_without_auth_everything_else_401(site):
    node, _, _ = site
    anonymous = client(node)
    assert anonymous.get("/healthz").json() == {"status": "ok"}
    ready = anonymous.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert set(ready.json()["checks"]) == {"store", "broker", "spool_disk", "model"}
    assert "anatomix_studies" in anonymous.get("/metrics").text
    schema = anonymous.get("/openapi.json").json()
    operations = [(m.upper(), p) for p, item in schema["paths"].items() for m in item if p.startswith("/api/") and p != "/api/auth/login"]
    assert len(operations) >= 25
    for method, path in operations:
        concrete = path.replace("{name}", "pacs").replace("{token_id}", "1").replace("{study_instance_uid}", "1.2.3")
        response = anonymous.request(method, concrete, json={} if method in ("POST", "PATCH", "PUT") else None)
        assert_problem(response, 401, "authentication required")
        assert response.headers["www-authenticate"] == "Bearer"
    # A wrong token is told apart from none.
    assert_problem(client(node, "axn_not-a-token").get("/api/nodes"), 401, "unknown, revoked")
    assert_problem(anonymous.get("/api/no-such-thing"), 404, "no such endpoint")


@pytest.mark.parametrize("method,path,body,needed", ROLE_TABLE, ids=[f"{m} {p}" for m, p, _, _ in ROLE_TABLE])
def test_each_endpoint_answers_403_below_its_role_and_not_403_from_it(site, method, path, body, needed):
    node, accounts, _ = site
    for role in ROLES:
        response = client(node, accounts.tokens[role]).request(method, path, json=body)
        if ROLES.index(role) < ROLES.index(needed):
            assert_problem(response, 403, f"needs the {needed} role", role)
        else:
            assert response.status_code not in (401, 403), (role, response.status_code, response.text)


def test_cli_user_add_prints_a_one_time_password_that_logs_in_and_reads_one_from_stdin(site):
    node, _, _ = site
    added = subprocess.run(node_command("user", "add", "carol", "--role", "operator", "--config", str(node.config_path)),
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert added.returncode == 0, added.stderr
    password = next(line.split(": ", 1)[1] for line in added.stdout.splitlines() if line.startswith("one-time password: "))
    browser = client(node)
    login = browser.post("/api/auth/login", json={"username": "carol", "password": password})
    assert login.status_code == 200 and login.json()["role"] == "operator" and login.json()["must_change_password"] is True, login.text
    # The one-time password opens nothing but its own change (issue 21).
    csrf = {"X-CSRF-Token": login.json()["csrf_token"]}
    assert_problem(browser.get("/api/studies"), 403, "one-time password")
    assert browser.get("/api/auth/me").json()["must_change_password"] is True
    change = "/api/auth/password"
    assert_problem(browser.post(change, json={"current_password": "not it", "new_password": "a new long password"}, headers=csrf), 422, "not your current")
    assert_problem(browser.post(change, json={"current_password": password, "new_password": "short"}, headers=csrf), 422, "at least 12")
    assert_problem(browser.post(change, json={"current_password": password, "new_password": password}, headers=csrf), 422, "other than")
    assert browser.post(change, json={"current_password": password, "new_password": "carol's own password"}, headers=csrf).status_code == 204
    assert browser.get("/api/studies").status_code == 200  # the same session goes on
    assert client(node).post("/api/auth/login", json={"username": "carol", "password": password}).status_code == 401

    chosen = "correct horse battery staple"
    piped = subprocess.run(node_command("user", "add", "dave", "--role", "viewer", "--password-stdin", "--config", str(node.config_path)),
                           cwd=REPO_ROOT, input=chosen + "\n", capture_output=True, text=True, timeout=120)  # fmt: skip
    assert piped.returncode == 0 and "one-time password" not in piped.stdout, piped
    assert client(node).post("/api/auth/login", json={"username": "dave", "password": chosen}).status_code == 200
    short = subprocess.run(node_command("user", "add", "erin", "--role", "viewer", "--password-stdin", "--config", str(node.config_path)),
                           cwd=REPO_ROOT, input="short\n", capture_output=True, text=True, timeout=120)  # fmt: skip
    assert short.returncode == 2 and "at least 12 characters" in short.stderr and "Traceback" not in short.stderr
    again = subprocess.run(node_command("user", "add", "carol", "--role", "admin", "--config", str(node.config_path)),
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert again.returncode == 2 and "already exists" in again.stderr
    token = subprocess.run(node_command("user", "token", "dave", "--label", "ci", "--config", str(node.config_path)),
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert token.returncode == 0, token.stderr
    assert client(node, token.stdout.strip().splitlines()[-1]).get("/api/auth/me").json() == {
        "user": "dave",
        "role": "viewer",
        "via": "token",
        "must_change_password": False,
    }
    assert {e.detail["target"] for e in audit_events(node, "api_change") if e.detail.get("via") == "cli"} >= {"carol", "dave"}


def test_failed_logins_are_audited_and_rate_limited(site):
    node, accounts, _ = site
    anonymous = client(node)
    for _ in range(3):
        assert_problem(anonymous.post("/api/auth/login", json={"username": "viewer", "password": "wrong password!"}), 401, "wrong user name or password")
    # Past the limit even the right password is refused, with Retry-After, until the window passes.
    limited = anonymous.post("/api/auth/login", json={"username": "viewer", "password": accounts.passwords["viewer"]})
    assert_problem(limited, 429, "too many failed logins")
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    failed = [e for e in audit_events(node, "api_login_failed") if e.detail["user"] == "viewer"]
    assert len(failed) == 3 and all(e.detail["reason"] == "wrong password" and e.peer_host == "127.0.0.1" for e in failed)
    assert any(e.detail["user"] == "viewer" for e in audit_events(node, "api_login_rate_limited"))
    assert_problem(anonymous.post("/api/auth/login", json={"username": "nobody", "password": "x"}), 401)
    assert any(e.detail["reason"] == "unknown user" for e in audit_events(node, "api_login_failed"))


def test_session_cookie_is_httponly_samesite_strict_and_state_changes_need_the_csrf_token(site):
    node, accounts, _ = site
    browser = client(node)
    login = browser.post("/api/auth/login", json={"username": "admin", "password": accounts.passwords["admin"]})
    assert login.status_code == 200, login.text
    cookie = login.headers["set-cookie"].lower()
    assert "anatomix_session=" in cookie and "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    csrf = login.json()["csrf_token"]
    assert browser.get("/api/auth/me").json() == {"user": "admin", "role": "admin", "via": "session", "must_change_password": False}
    body = {"name": "csrf-test", "ae_title": "CSRF", "host": "127.0.0.1", "port": 104, "role": "source"}
    assert_problem(browser.post("/api/nodes", json=body), 403, "CSRF")
    assert_problem(browser.post("/api/nodes", json=body, headers={"X-CSRF-Token": "forged"}), 403, "CSRF")
    assert browser.post("/api/nodes", json=body, headers={"X-CSRF-Token": csrf}).status_code == 201
    assert browser.delete("/api/nodes/csrf-test", headers={"X-CSRF-Token": csrf}).status_code == 204
    assert browser.post("/api/auth/logout", headers={"X-CSRF-Token": csrf}).status_code == 204
    browser.cookies.set("anatomix_session", login.cookies["anatomix_session"])  # a stolen cookie after logout
    assert_problem(browser.get("/api/auth/me"), 401, "session has expired or ended")
    assert any(e.detail["user"] == "admin" for e in audit_events(node, "api_login"))


def test_tokens_are_shown_once_stored_hashed_and_revocable(site):
    node, accounts, _ = site
    viewer = client(node, accounts.tokens["viewer"])
    created = viewer.post("/api/tokens", json={"label": "grafana"})
    assert created.status_code == 201, created.text
    secret = created.json()["token"]
    assert secret.startswith("axn_") and len(secret) > 40
    listed = viewer.get("/api/tokens").json()
    assert {t["label"] for t in listed} == {"tests", "grafana"} and all("token" not in t for t in listed)
    store = node.open_store()
    try:
        with store._transaction(write=False) as tx:
            stored = [row[0] for row in tx.all("SELECT token_hash FROM api_tokens")]
    finally:
        store.close()
    assert secret not in stored and len(stored[0]) == 64
    assert client(node, secret).get("/api/auth/me").json()["user"] == "viewer"
    # A viewer cannot revoke someone else's token, nor list them.
    others = client(node, accounts.tokens["admin"]).get("/api/tokens", params={"user": "admin"}).json()
    assert_problem(viewer.delete(f"/api/tokens/{others[0]['id']}"), 404, "of yours")
    assert_problem(viewer.get("/api/tokens", params={"user": "admin"}), 403)
    assert viewer.delete(f"/api/tokens/{created.json()['id']}").status_code == 204
    assert_problem(client(node, secret).get("/api/auth/me"), 401, "revoked")
    assert_problem(viewer.delete(f"/api/tokens/{created.json()['id']}"), 404)
    assert_problem(viewer.post("/api/tokens", json={"label": ""}), 422, "label")


def test_admin_manages_accounts_changes_are_audited_and_the_last_admin_stays(site):
    node, accounts, _ = site
    admin = client(node, accounts.tokens["admin"])
    made = admin.post("/api/users", json={"name": "frank", "role": "viewer"})
    assert made.status_code == 201 and len(made.json()["password"]) == 20 and made.json()["must_change_password"] is True, made.text
    first = client(node).post("/api/auth/login", json={"username": "frank", "password": made.json()["password"]})
    assert first.status_code == 200 and first.json()["must_change_password"] is True
    assert admin.get("/api/users").json()[0].get("password") is None
    assert_problem(admin.post("/api/users", json={"name": "frank", "role": "viewer"}), 409, "already exists")
    assert_problem(admin.post("/api/users", json={"name": "bad name!", "role": "viewer"}), 422, "name")
    assert_problem(admin.post("/api/users", json={"name": "gina", "role": "root"}), 422, "role")
    assert_problem(admin.post("/api/users", json={"name": "gina", "role": "viewer", "password": "short"}), 422, "12 characters")
    changed = admin.patch("/api/users/frank", json={"role": "operator", "reset_password": True})
    assert changed.status_code == 200 and changed.json()["role"] == "operator" and changed.json()["password"]
    assert changed.json()["must_change_password"] is True  # a reset is a one-time password too
    assert_problem(client(node).post("/api/auth/login", json={"username": "frank", "password": made.json()["password"]}), 401)
    assert_problem(admin.patch("/api/users/admin", json={"role": "viewer"}), 409, "only enabled admin")
    assert_problem(admin.delete("/api/users/admin"), 409, "only enabled admin")
    assert_problem(admin.patch("/api/users/nobody", json={"disabled": True}), 404, "nobody")
    disabled = admin.patch("/api/users/frank", json={"disabled": True})
    assert disabled.json()["disabled"] is True
    assert_problem(client(node).post("/api/auth/login", json={"username": "frank", "password": changed.json()["password"]}), 401)
    assert audit_events(node, "api_login_failed")[0].detail == {"user": "frank", "reason": "account disabled"}
    assert admin.delete("/api/users/frank").status_code == 204
    events = [e.detail for e in audit_events(node, "api_change") if e.detail.get("target") == "frank"]
    updates = [d for d in events if d["action"] == "user_updated"]
    # Newest first: the disabling, then the change of role (with its password reset).
    assert [(d["before"], d["after"], d["password_reset"]) for d in updates] == [
        ({"role": "operator", "disabled": False}, {"role": "operator", "disabled": True}, False),
        ({"role": "viewer", "disabled": False}, {"role": "operator", "disabled": False}, True),
    ]
    assert {d["action"] for d in events} >= {"user_added", "user_updated", "user_removed"} and all(d["user"] == "admin" for d in events)


def test_remote_nodes_crud_validation_and_echo_with_round_trip_time(site):
    node, accounts, _ = site
    admin, operator = client(node, accounts.tokens["admin"]), client(node, accounts.tokens["operator"])
    body = {"name": "self", "ae_title": "ANATOMIX", "host": "127.0.0.1", "port": node.port, "role": "both"}
    added = admin.post("/api/nodes", json=body)
    assert added.status_code == 201 and added.json()["profile"] == "full", added.text
    assert_problem(admin.post("/api/nodes", json=body), 409, "already exists")
    assert_problem(admin.post("/api/nodes", json={**body, "name": "x", "ae_title": "BAD\\AE"}), 422, "ae_title", "a backslash is not allowed")
    # The CLI's words, never pydantic's, and a title too long is refused, not cut (issue 21).
    long_title = assert_problem(admin.post("/api/nodes", json={**body, "name": "x", "ae_title": "HOSPITAL_PACS_ARCHIVE"}), 422, "21 characters, at most 16")
    assert long_title["errors"] == [{"where": "body.ae_title", "message": long_title["detail"]}]
    assert_problem(admin.post("/api/nodes", json={**body, "name": "x", "port": 70000}), 422, "port 70000: out of range")
    assert_problem(admin.post("/api/nodes", json={**body, "name": "x", "port": "eleven"}), 422, "port 'eleven': not a number")
    assert admin.post("/api/nodes", json={**body, "name": "x", "port": str(node.port)}).status_code == 201
    assert admin.delete("/api/nodes/x").status_code == 204
    assert_problem(admin.post("/api/nodes", json={**body, "name": "x", "host": "*", "role": "destination"}), 422, "host '*' only suits a source")
    assert_problem(admin.post("/api/nodes", json={**body, "name": "x", "profile": "nope"}), 422, "nope")
    assert_problem(admin.post("/api/nodes", json={**body, "name": "-x"}), 422, "name")
    assert_problem(admin.post("/api/nodes", content=b"{not json", headers={"content-type": "application/json"}), 422)
    assert {"modality", "pacs", "self"} <= {n["name"] for n in operator.get("/api/nodes").json()}

    # C-ECHO our own SCP (the node knows itself as a source now) and a port where nothing listens.
    echo = operator.post("/api/nodes/self/echo", json={"timeout_s": 10}).json()
    assert echo["success"] is True and echo["error"] is None and 0 < echo["rtt_ms"] < 10_000, echo
    assert admin.patch("/api/nodes/self", json={"port": 1}).json()["port"] == 1
    failed = operator.post("/api/nodes/self/echo", json={"timeout_s": 5}).json()
    assert failed["success"] is False and failed["rtt_ms"] is None and "cannot connect" in failed["error"], failed
    assert_problem(admin.patch("/api/nodes/self", json={"ae_title": ""}), 422, "ae_title")
    assert_problem(admin.patch("/api/nodes/self", json={"host": "0" * 64}), 422, "host")
    # A host the resolver cannot even encode (as `ae add` may store one): a failed echo, not a 500.
    store = node.open_store()
    try:
        store.add_remote_node(RemoteNode("odd", "ODD", "0" * 64, 104, role="destination"))
    finally:
        store.close()
    odd = operator.post("/api/nodes/odd/echo", json={"timeout_s": 5})
    assert odd.status_code == 200 and odd.json()["success"] is False and "0" * 64 in odd.json()["error"], odd.text
    assert_problem(admin.patch("/api/nodes/ghost", json={"port": 2}), 404, "ghost")
    assert_problem(operator.post("/api/nodes/ghost/echo"), 404, "ghost")
    assert admin.delete("/api/nodes/self").status_code == 204
    assert_problem(admin.get("/api/nodes/self"), 404)
    changes = [e.detail for e in audit_events(node, "api_change") if e.detail.get("target") == "self"]
    update = next(d for d in changes if d["action"] == "node_updated")
    assert update["before"] == {"port": node.port} and update["after"] == {"port": 1} and update["user"] == "admin"
    assert next(d for d in changes if d["action"] == "node_removed")["before"]["ae_title"] == "ANATOMIX"


def test_studies_dead_letters_resend_and_reanalyze(site):
    node, accounts, pacs = site
    viewer, operator = client(node, accounts.tokens["viewer"]), client(node, accounts.tokens["operator"])
    settings = load_settings(node.config_path)
    uid = generate_uid()
    store = node.open_store()
    try:
        seed_study(store, settings, uid, 2)
        assert store.transition_study(uid, 1, ("delivering",), "done")
        store.upsert_delivery(DeliveryRecord(uid, 1, "pacs", "1.2.9.9", "dead", 7, 0xA700, "out of resources at the PACS",
                                             datetime.now(UTC)))  # fmt: skip
    finally:
        store.close()

    listed = viewer.get("/api/studies", params={"state": "done", "source": "MODALITY"}).json()
    assert [s["study_instance_uid"] for s in listed] == [uid]
    assert viewer.get("/api/studies", params={"source": "ELSEWHERE"}).json() == []
    assert viewer.get("/api/studies", params={"since": (datetime.now(UTC) + timedelta(hours=1)).isoformat()}).json() == []
    assert_problem(viewer.get("/api/studies", params={"state": "sleeping"}), 422, "state")
    assert_problem(viewer.get("/api/studies", params={"limit": 0}), 422, "limit")
    detail = viewer.get(f"/api/studies/{uid}").json()
    assert [st["state"] for st in detail["stages"]] == ["receiving", "stable", "queued", "analyzing", "analyzed", "delivering", "done"]
    assert len(detail["result_objects"]) == 2 and len(detail["instances"]) == 1
    assert detail["deliveries"][0]["name"] == "pacs" and detail["deliveries"][0]["dead"] == 1
    dead = viewer.get("/api/dead-letters").json()
    assert [(d["study_instance_uid"], d["destination"], d["attempts"], d["last_status"]) for d in dead] == [(uid, "pacs", 7, "0xA700")]
    assert_problem(viewer.get("/api/studies/1.2.404"), 404, "1.2.404")

    resent = operator.post(f"/api/studies/{uid}/resend", json={})
    assert resent.status_code == 200, resent.text
    assert resent.json()["ok"] is True and "pacs: 2/2 sent" in resent.json()["message"], resent.json()
    assert len(pacs.sop_instance_uids()) == 2
    assert_problem(operator.post(f"/api/studies/{uid}/resend", json={"destination": "modality"}), 422, "not a configured destination")
    assert_problem(operator.post("/api/studies/1.2.404/resend"), 404)
    bulk = operator.post("/api/resend", json={"states": ["done"], "since": "2020-01-01"}).json()
    assert bulk["matched"] == 1 and bulk["results"][0]["ok"] is True and len(pacs.sop_instance_uids()) == 4
    assert_problem(operator.post("/api/resend", json={}), 422, "states")
    assert_problem(operator.post("/api/resend", json={"states": ["receiving"]}), 422, "states")
    resends = [e for e in audit_events(node, "study_resent") if e.study_instance_uid == uid]
    assert len(resends) == 2
    changes = [e.detail for e in audit_events(node, "api_change")]
    assert [(d["user"], d["ok"]) for d in changes if d["action"] == "study_resend" and d["target"] == uid] == [("operator", True)]
    assert any(d["action"] == "bulk_resend" and d["ok"] == 1 and d["selection"]["states"] == ["done"] for d in changes)

    # The store-computed metrics see the deliveries and the study's stages.
    from prometheus_client.parser import text_string_to_metric_families

    samples = [(s.name, s.labels, s.value) for f in text_string_to_metric_families(client(node).get("/metrics").text) for s in f.samples]
    deliveries = {(lab["destination"], lab["status"]): v for name, lab, v in samples if name == "anatomix_deliveries"}
    assert deliveries == {("pacs", "sent"): 2, ("pacs", "dead"): 1}, deliveries
    assert any(name == "anatomix_stage_seconds_count" and lab["stage"] == "delivery" and v >= 1 for name, lab, v in samples)
    assert ("anatomix_studies", {"state": "done"}, 1.0) in samples

    # No model configured: reanalysis is refused plainly (409), single and bulk.
    assert_problem(operator.post(f"/api/studies/{uid}/reanalyze", json={"new_version": True}), 409, "nothing can be analysed")
    assert_problem(operator.post("/api/reanalyze", json={"states": ["failed"]}), 409, "nothing can be analysed")
    model = viewer.get("/api/model").json()
    assert model["configured"] is False and model["demo_weights"] is False and model["last_used"] is None
    status = viewer.get("/api/status").json()
    assert status["studies_by_state"]["done"] == 1 and status["dead_letters"] == 1 and status["disk"]["free_bytes"] > 0
    assert status["queue_depths"] == {"analyze": 0, "deliver": 0} or set(status["queue_depths"]) == {"analyze", "deliver"}


def test_audit_query_and_json_lines_export_which_is_audited(site):
    node, accounts, _ = site
    admin, viewer = client(node, accounts.tokens["admin"]), client(node, accounts.tokens["viewer"])
    viewer.post("/api/tokens", json={"label": "audit-me"})
    events = viewer.get("/api/audit", params={"event": "api_change", "limit": 5}).json()
    assert 1 <= len(events) <= 5 and all(e["event"] == "api_change" for e in events)
    assert events[0]["detail"]["action"] == "token_created" and events[0]["detail"]["user"] == "viewer"
    assert viewer.get("/api/audit", params={"since": "2999-01-01T00:00:00Z"}).json() == []
    assert_problem(viewer.get("/api/audit", params={"limit": -1}), 422, "limit")
    with admin.stream("GET", "/api/audit/export") as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert len(lines) > 10 and [x["id"] for x in lines] == sorted(x["id"] for x in lines)
    assert {"api_login", "api_change", "api_login_failed"} <= {x["event"] for x in lines}
    exported = viewer.get("/api/audit", params={"event": "audit_exported"}).json()
    assert exported and exported[0]["detail"]["user"] == "admin" and exported[0]["detail"]["events"] == len(lines)


def test_http_port_in_use_is_reported_and_the_dicom_service_runs_without_the_api(tmp_path):
    import socket

    from tests.support.dcmtk import echoscu

    node = api_node(tmp_path / "busy")
    node.add_source("moda", "MODA")
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", node.settings["http"]["port"]))
    blocker.listen(1)
    try:
        node.start()
        assert f"cannot listen for HTTP on 127.0.0.1:{node.settings['http']['port']}" in node.log_text()
        assert echoscu(node.port, "MODA", node.ae_title).returncode == 0
    finally:
        node.stop()
        blocker.close()


def test_routing_rules_crud_validation_dry_run_and_audit(site):
    """The same rules as `anatomix-node route`: field-named validation errors, order, the dry run's
    explanation, and an audit event with before/after for every change."""
    node, accounts, _ = site
    admin, viewer = client(node, accounts.tokens["admin"]), client(node, accounts.tokens["viewer"])
    bad = admin.post("/api/routing-rules", json={"name": "to-nowhere", "match": {"modality": ["CR"]}, "action": {"destinations": ["no-such-pacs"]}})
    body = assert_problem(bad, 422, "no-such-pacs")
    assert [e["field"] for e in body["errors"]] == ["action.destinations[0]"], body
    assert_problem(admin.post("/api/routing-rules", json={"name": "empty", "action": {"destinations": ["pacs"]}}), 422)
    first = admin.post("/api/routing-rules", json={"name": "cr-to-pacs", "match": {"modality": ["CR"]}, "action": {"destinations": ["pacs"]}})
    assert first.status_code == 201, first.text
    second = admin.post("/api/routing-rules", json={"name": "from-modality", "match": {"calling_ae": ["MODAL*"]},
                                                    "action": {"destinations": ["pacs"], "profile": "sr-only"}})  # fmt: skip
    assert second.status_code == 201 and second.json()["position"] == first.json()["position"] + 1, second.text
    assert_problem(
        admin.post("/api/routing-rules", json={"name": "cr-to-pacs", "match": {"modality": ["DX"]}, "action": {"destinations": ["pacs"]}}), 409, "PUT"
    )
    changed = admin.put("/api/routing-rules/from-modality", json={**second.json(), "description": "the ward's modality"})
    assert changed.status_code == 200 and changed.json()["description"] == "the ward's modality", changed.text
    moved = admin.post("/api/routing-rules/from-modality/move", json={"position": 1})
    assert moved.status_code == 200 and moved.json()["position"] == 1, moved.text
    names = [r["name"] for r in viewer.get("/api/routing-rules").json()]
    assert names[0] == "from-modality" and names.index("cr-to-pacs") > 0, names

    uid = generate_uid()
    store = node.open_store()
    try:
        seed_study(store, load_settings(node.config_path), uid, 1)
    finally:
        store.close()
    dry = viewer.post("/api/routing-rules/dry-run", json={"study_instance_uid": uid})
    assert dry.status_code == 200, dry.text
    assert dry.json()["rule"] == "from-modality"
    assert dry.json()["destinations"] == [{"name": "pacs", "profile": "sr-only", "reason": dry.json()["destinations"][0]["reason"]}]
    assert any("from-modality" in line and "MATCHED" in line for line in dry.json()["explanation"]), dry.json()
    assert_problem(viewer.post("/api/routing-rules/dry-run", json={"study_instance_uid": "1.2.3.4.404"}), 404)

    assert admin.delete("/api/routing-rules/from-modality").status_code == 204
    assert_problem(viewer.get("/api/routing-rules/from-modality"), 404)
    changes = [(e.detail.get("change"), e.detail.get("rule"), e.detail.get("user")) for e in audit_events(node, "routing_rule_changed")]
    for expected in [("add", "cr-to-pacs", "admin"), ("update", "from-modality", "admin"), ("move", "from-modality", "admin"),
                     ("remove", "from-modality", "admin")]:  # fmt: skip
        assert expected in changes, changes
    removal = next(e for e in audit_events(node, "routing_rule_changed") if e.detail.get("change") == "remove")
    assert removal.detail["before"]["action"]["profile"] == "sr-only" and removal.detail["after"] is None
