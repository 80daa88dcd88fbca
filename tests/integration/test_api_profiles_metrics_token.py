"""The operations API of a real ``serve``: output profiles as a read-only resource (from the settings
file, with the nodes and routing rules that refer to them, which are validated against them), and
``/metrics`` behind ``http.metrics_token_file``."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dicom_node.store.base import RemoteNode
from tests.support.api import api_node, client, make_accounts, wait_for_http

TOKEN = "scrape-me-3b7f1c0e9d"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("api-profiles")
    token_file = workdir / "metrics.token"
    token_file.write_text(TOKEN + "\n")
    node = api_node(workdir, settings={
        "http": {"metrics_token_file": "metrics.token"},  # relative to the settings file
        "output": {"default_profile": "sr-only", "profiles.minimal": ["gsps", "sc"], "profiles.ohif": ["seg"]},
    })  # fmt: skip
    node.write_config()
    store = node.open_store()
    try:
        store.add_remote_node(RemoteNode("pacs", "PACS", "127.0.0.1", 104, role="destination", profile="minimal"))
        store.add_remote_node(RemoteNode("viewer", "VIEWER", "127.0.0.1", 105, role="destination", profile="ohif"))
        # A profile an earlier settings file defined: the reference is shown as dangling.
        store.add_remote_node(RemoteNode("old", "OLD", "127.0.0.1", 106, role="destination", profile="retired"))
    finally:
        store.close()
    accounts = make_accounts(node)
    node.start()
    wait_for_http(node)
    yield node, accounts, token_file
    node.stop()


def test_profiles_are_listed_from_the_settings_file_with_what_refers_to_them(site):
    node, accounts, _ = site
    viewer = client(node, accounts.tokens["viewer"])
    admin = client(node, accounts.tokens["admin"])
    rule = {"name": "cr-minimal", "match": {"modality": ["CR"]}, "action": {"destinations": ["viewer"], "profile": "minimal"}}
    assert admin.post("/api/routing-rules", json=rule).status_code == 201

    listed = viewer.get("/api/profiles")
    assert listed.status_code == 200, listed.text
    profiles = {p["name"]: p for p in listed.json()}
    assert set(profiles) == {"full", "pacs-basic", "ohif", "sr-only", "minimal"}
    assert profiles["minimal"] == {"name": "minimal", "kinds": ["gsps", "sc"], "default": False, "source": "settings",
                                   "nodes": ["pacs"], "routing_rules": ["cr-minimal"]}  # fmt: skip
    assert profiles["ohif"]["kinds"] == ["seg"] and profiles["ohif"]["source"] == "settings"  # overridden
    assert profiles["sr-only"]["default"] is True and profiles["sr-only"]["source"] == "built-in"
    assert viewer.get("/api/profiles/minimal").json() == profiles["minimal"]
    missing = viewer.get("/api/profiles/retired")
    assert missing.status_code == 404 and "settings file" in missing.json()["detail"] and "minimal" in missing.json()["detail"]
    assert viewer.get("/api/profile-references").json() == {"unknown_profile": [{"kind": "node", "name": "old", "profile": "retired"}]}

    # Saving a node or a rule checks its profile against this list.
    bad_node = admin.post("/api/nodes", json={"name": "x", "ae_title": "X", "host": "127.0.0.1", "port": 104,
                                              "role": "destination", "profile": "retired"})  # fmt: skip
    assert bad_node.status_code == 422 and "minimal" in bad_node.json()["detail"], bad_node.text
    assert admin.patch("/api/nodes/pacs", json={"profile": "nope"}).status_code == 422
    bad_rule = admin.post("/api/routing-rules", json={**rule, "name": "r2", "action": {"destinations": ["pacs"], "profile": "retired"}})
    assert bad_rule.status_code == 422 and any(e["field"] == "action.profile" for e in bad_rule.json()["errors"]), bad_rule.text

    schema = client(node).get("/openapi.json").json()
    assert "edited in the settings file" in schema["paths"]["/api/profiles"]["get"]["description"]
    assert client(node).get("/api/profiles").status_code == 401


def test_metrics_need_the_token_from_the_file_once_it_is_set(site):
    node, accounts, token_file = site
    anonymous = client(node)
    refused = anonymous.get("/metrics")
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer" and "metrics token" in refused.json()["detail"]
    assert client(node, "wrong-token").get("/metrics").status_code == 401
    assert client(node, accounts.tokens["admin"]).get("/metrics").status_code == 401  # an API token is not the scrape token
    scraped = client(node, TOKEN).get("/metrics")
    assert scraped.status_code == 200, scraped.text
    assert "anatomix_studies" in {f.name for f in text_string_to_metric_families(scraped.text)}
    # Read at each scrape: replacing the file rotates the token; an unreadable file says so (503).
    token_file.write_text("rotated-token\n")
    assert client(node, TOKEN).get("/metrics").status_code == 401
    assert client(node, "rotated-token").get("/metrics").status_code == 200
    token_file.unlink()
    unreadable = client(node, "rotated-token").get("/metrics")
    assert unreadable.status_code == 503 and "metrics_token_file" in unreadable.json()["detail"]
    token_file.write_text(TOKEN)
    # /healthz and /readyz stay open.
    assert anonymous.get("/healthz").status_code == 200 and anonymous.get("/readyz").status_code in (200, 503)


def test_a_node_s_client_certificate_rule_is_an_api_field_and_a_patch_keeps_its_tls_files(site):
    node, accounts, _ = site
    admin, viewer = client(node, accounts.tokens["admin"]), client(node, accounts.tokens["viewer"])
    body = {"name": "ct", "ae_title": "CT1", "host": "127.0.0.1", "port": 104, "role": "source", "tls_client_certificate": "required"}
    added = admin.post("/api/nodes", json=body)
    assert added.status_code == 201 and added.json()["tls_client_certificate"] == "required", added.text
    assert viewer.get("/api/nodes/ct").json()["tls_client_certificate"] == "required"
    assert admin.post("/api/nodes", json={**body, "name": "ct2", "tls_client_certificate": "sometimes"}).status_code == 422
    assert admin.patch("/api/nodes/ct", json={"port": 105}).json()["tls_client_certificate"] == "required"
    patched = admin.patch("/api/nodes/ct", json={"tls_client_certificate": "optional"})
    assert patched.status_code == 200 and patched.json()["tls_client_certificate"] == "optional", patched.text
    store = node.open_store()
    try:
        assert store.get_remote_node("ct").tls_client_certificate == "optional"
        from dataclasses import replace

        store.update_remote_node(replace(store.get_remote_node("pacs"), tls=True, tls_ca_file="/etc/ca.pem", tls_check_hostname=False))
    finally:
        store.close()
    pacs = admin.patch("/api/nodes/pacs", json={"port": 4242}).json()
    assert (pacs["tls"], pacs["tls_check_hostname"], pacs["tls_verify_peer"]) == (True, False, True)
    store = node.open_store()
    try:
        assert store.get_remote_node("pacs").tls_ca_file == "/etc/ca.pem"
        changes = [e.detail for e in store.list_audit_events("api_change") if e.detail.get("target") == "ct"]
    finally:
        store.close()
    update = next(d for d in changes if d["action"] == "node_updated" and "tls_client_certificate" in d["before"])
    assert update["before"]["tls_client_certificate"] == "required" and update["after"]["tls_client_certificate"] == "optional"
