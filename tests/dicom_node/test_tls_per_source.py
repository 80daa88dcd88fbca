"""DICOM TLS per remote node (issue 10): a source that requires a client certificate is refused
(A-ASSOCIATE-RJ, audited and logged with the reason) when it connects without one, while other
sources on the same TLS port, where certificates are optional, are not; and as SCU, the host-name
check can be switched off on its own while the certificate chain is still verified. Real DCMTK
peers, certificates from throw-away CAs (:mod:`tests.support.pki`)."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from dicom_node.audit import trail as audit
from dicom_node.net.tls import client_tls_args
from dicom_node.store.base import RemoteNode
from tests.dicom_node.test_tls import (  # noqa: F401 (pki and tls_storescp are fixtures)
    Pki,
    TlsScp,
    client_tls,
    destination,
    node_cli,
    outgoing,
    pki,
    send,
    site,
    start_tls_scp,
    tls_settings,
    tls_storescp,
)
from tests.support.dcmtk import StoreScp, run_dcmtk
from tests.support.pki import TestCa


def echo(port: int, calling: str, *tls: str) -> subprocess.CompletedProcess:
    return run_dcmtk("echoscu", *tls, "-to", "20", "-aet", calling, "-aec", "ANATOMIX", "127.0.0.1", str(port), timeout=60)


@pytest.fixture
def optional_tls_scp(tmp_path: Path, pki: Pki) -> Iterator[TlsScp]:
    """The TLS port asks for client certificates without requiring them; MODALITY requires one, OTHER not."""
    running = start_tls_scp(tmp_path, tls_settings(tmp_path, pki, require_client_certificate=False))
    modality = running.store.get_remote_node("modality")
    running.store.update_remote_node(replace(modality, tls_client_certificate="required"))
    running.store.add_remote_node(RemoteNode(name="other", ae_title="OTHER", host="127.0.0.1", port=104, role="source"))
    yield running
    for server in running.servers:
        server.shutdown()
    running.store.close()


def test_a_source_that_requires_a_client_certificate_is_refused_without_one(optional_tls_scp: TlsScp, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    scp = optional_tls_scp
    anonymous = ("+tla", "+cf", str(pki.ca.cert_path))
    caplog.set_level(logging.WARNING, logger="dicom_node.net.scp")
    assert echo(scp.tls_port, "MODALITY", *client_tls(pki)).returncode == 0
    refused_tls = echo(scp.tls_port, "MODALITY", *anonymous)
    refused_plain = echo(scp.plain_port, "MODALITY")
    assert refused_tls.returncode != 0 and refused_plain.returncode != 0
    assert "Association Rejected" in refused_tls.stderr + refused_tls.stdout, refused_tls.stderr
    # Another source on the same port needs none; a rejection is per source, not per port.
    assert echo(scp.tls_port, "OTHER", *anonymous).returncode == 0
    assert echo(scp.plain_port, "OTHER").returncode == 0

    rejected = scp.store.list_audit_events(audit.ASSOCIATION_REJECTED)
    reasons = sorted(row.detail["reason"] for row in rejected)
    assert len(reasons) == 2 and all(r.startswith("source modality requires a client certificate") for r in reasons), reasons
    assert any("over TLS" in r for r in reasons) and any("without TLS" in r for r in reasons), reasons
    assert {row.calling_ae for row in rejected} == {"MODALITY"}
    assert sum("requires a client certificate" in r.getMessage() for r in caplog.records) == 2
    accepted = scp.store.list_audit_events(audit.ASSOCIATION_ACCEPTED)
    assert sorted(row.calling_ae for row in accepted) == ["MODALITY", "OTHER", "OTHER"]


def test_ae_add_and_update_set_the_client_certificate_rule_and_the_hostname_check(site: Path) -> None:
    import json

    added = node_cli(site, "ae", "add", "modality", "--ae-title", "MOD", "--host", "127.0.0.1", "--role", "source",
                     "--tls-client-certificate", "required")  # fmt: skip
    assert added.returncode == 0, added.stderr
    added = node_cli(site, "ae", "add", "pacs", "--ae-title", "PACS", "--host", "pacs.example", "--port", "2762",
                     "--role", "destination", "--tls", "--no-tls-hostname-check")  # fmt: skip
    assert added.returncode == 0, added.stderr
    listed = {n["name"]: n for n in json.loads(node_cli(site, "ae", "list", "--json").stdout)}
    assert listed["modality"]["tls_client_certificate"] == "required"
    assert listed["pacs"]["tls_check_hostname"] is False and listed["pacs"]["tls_verify_peer"] is True
    assert listed["pacs"]["tls_client_certificate"] == "optional"
    assert node_cli(site, "ae", "update", "modality", "--tls-client-certificate", "optional").returncode == 0
    assert node_cli(site, "ae", "update", "pacs", "--tls-hostname-check").returncode == 0
    listed = {n["name"]: n for n in json.loads(node_cli(site, "ae", "list", "--json").stdout)}
    assert listed["modality"]["tls_client_certificate"] == "optional" and listed["pacs"]["tls_check_hostname"] is True
    bad = node_cli(site, "ae", "update", "modality", "--tls-client-certificate", "sometimes")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_the_hostname_check_can_be_skipped_while_the_chain_is_still_verified(tls_storescp: StoreScp, pki: Pki, tmp_path: Path) -> None:
    """The receiver's certificate names localhost and 127.0.0.1; we connect to 127.0.0.2 (loopback too)."""
    objects = outgoing(tmp_path / "out", 1)
    elsewhere = replace(destination(tls_storescp.port, pki), host="127.0.0.2")
    context, _ = client_tls_args(elsewhere)
    assert context.check_hostname is True
    (mismatch,) = send(elsewhere, objects)
    assert mismatch.status is None and mismatch.outcome == "transient", mismatch
    no_hostname_check = replace(elsewhere, tls_check_hostname=False)
    context, _ = client_tls_args(no_hostname_check)
    assert context.check_hostname is False and context.verify_mode.name == "CERT_REQUIRED"
    other_ca = TestCa(tmp_path / "other", "Other CA")
    (untrusted,) = send(replace(no_hostname_check, tls_ca_file=str(other_ca.cert_path)), objects)
    assert untrusted.status is None and untrusted.outcome == "transient", untrusted
    (sent,) = send(no_hostname_check, objects)
    assert sent.status == 0x0000, sent


def test_start_up_warns_when_a_source_requires_a_certificate_the_port_never_asks_for(tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    from dicom_node.net.tls import log_certificate_expiry

    source = RemoteNode(name="ct", ae_title="CT", host="127.0.0.1", port=104, role="source", tls_client_certificate="required")
    caplog.set_level(logging.INFO, logger="dicom_node.net.tls")
    log_certificate_expiry(tls_settings(tmp_path, pki), [source])
    assert not [r for r in caplog.records if "requires a client certificate" in r.getMessage()]
    log_certificate_expiry(tls_settings(tmp_path, pki, ca_certificates=None, require_client_certificate=False), [source])
    [warning] = [r for r in caplog.records if "requires a client certificate" in r.getMessage()]
    assert warning.levelname == "WARNING" and "tls.ca_certificates" in warning.getMessage()
