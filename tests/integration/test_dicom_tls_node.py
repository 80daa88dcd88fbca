"""``anatomix-node serve`` with ``[tls]``: DCMTK storescu/echoscu ``+tls`` to the TLS port beside the
plain one (two SCP processes), the refusals, the expiry warning at start, TLS-only mode, bad files.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.api import http_url, make_accounts, wait_for_http
from tests.support.dcmtk import run_dcmtk
from tests.support.net import free_port
from tests.support.node import NodeProcess
from tests.support.pki import Issued, TestCa

STUDY = "1.2.826.0.1.3680043.10.1431.78"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCa:
    return TestCa(tmp_path_factory.mktemp("pki"), "Hospital CA")


@pytest.fixture(scope="module")
def client(ca: TestCa) -> Issued:
    return ca.issue("modality", server=False)


def tls_node(workdir: Path, ca: TestCa, server: Issued, **tls: object) -> NodeProcess:
    node = NodeProcess(workdir, scp_processes=2, settings={
        "assembly": {"quiet_period_s": 600, "hard_cap_s": 600}, "http": {"port": free_port()},
        "tls": {"enabled": True, "port": free_port(), "certificate": str(server.certificate), "private_key": str(server.key),
                "ca_certificates": str(ca.cert_path), **tls},
    })  # fmt: skip
    node.add_source("modality", "MODALITY")
    return node


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, ca: TestCa) -> Iterator[NodeProcess]:
    running = tls_node(tmp_path_factory.mktemp("node"), ca, ca.issue("anatomix node", server=True, days=20)).start()
    yield running
    running.stop()


def tls_port(node: NodeProcess) -> int:
    return int(node.settings["tls"]["port"])


def dcmtk_tls(ca: TestCa, issued: Issued | None) -> tuple[str, ...]:
    identity = ("+tls", str(issued.key), str(issued.certificate)) if issued is not None else ("+tla",)
    return (*identity, "+cf", str(ca.cert_path))


def echo(port: int, *options: str) -> subprocess.CompletedProcess:
    return run_dcmtk("echoscu", *options, "-to", "20", "-aet", "MODALITY", "-aec", "ANATOMIX", "127.0.0.1", str(port), timeout=60)


def test_storescu_and_echoscu_tls_with_a_trusted_certificate_beside_the_plain_port(node: NodeProcess, ca: TestCa, client: Issued, tmp_path: Path) -> None:
    from tests.support.corpus import write_synthetic_set

    files = write_synthetic_set(tmp_path / "in", 3, study_uid=STUDY)
    sent = run_dcmtk("storescu", *dcmtk_tls(ca, client), "-aet", "MODALITY", "-aec", "ANATOMIX", "127.0.0.1", str(tls_port(node)),
                     *[str(f) for f in files], timeout=120)  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    assert {pydicom.dcmread(p).SOPInstanceUID for p in node.spooled_files()} >= {pydicom.dcmread(f).SOPInstanceUID for f in files}
    assert echo(tls_port(node), *dcmtk_tls(ca, client)).returncode == 0
    assert echo(node.port).returncode == 0  # plain DICOM on node.port, side by side


def test_clients_without_a_trusted_certificate_are_refused_and_the_node_keeps_serving(node: NodeProcess, ca: TestCa, client: Issued, tmp_path: Path) -> None:
    rogue = TestCa(tmp_path / "rogue", "Rogue CA").issue("intruder", server=False)
    assert echo(tls_port(node), *dcmtk_tls(ca, None)).returncode != 0  # no client certificate
    assert echo(tls_port(node), *dcmtk_tls(ca, rogue)).returncode != 0  # one from a CA the node does not trust
    assert echo(tls_port(node)).returncode != 0  # plain DICOM on the TLS port
    assert echo(tls_port(node), *dcmtk_tls(ca, client)).returncode == 0


def test_start_up_logs_each_certificate_and_warns_within_30_days(node: NodeProcess) -> None:
    text = node.log_text()
    assert f"port {node.port}, TLS port {tls_port(node)}" in text
    warnings = [line for line in text.splitlines() if "WARNING" in line and "TLS: scp certificate" in line]
    assert len(warnings) == 1 and "expires in" in warnings[0], text[-2000:]
    assert "TLS: scp trusted CA" in text and "Traceback" not in text


def test_certificate_expiry_is_in_the_status_api_and_the_metrics(node: NodeProcess) -> None:
    """The SCP certificate (20 days left) and the CA: /api/status gives days left and the start-up
    log's warning, /metrics the expiry time per certificate for an alert rule."""
    wait_for_http(node)
    token = make_accounts(node, ("viewer",)).tokens["viewer"]
    status = httpx.get(http_url(node) + "/api/status", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert status.status_code == 200, status.text
    by_role = {c["role"]: c for c in status.json()["certificates"]}
    assert set(by_role) == {"scp certificate", "scp trusted CA"}, by_role
    scp = by_role["scp certificate"]
    assert 19 <= scp["days_left"] <= 20 and "anatomix node" in scp["subject"] and "expires in" in scp["warning"], scp
    assert by_role["scp trusted CA"]["warning"] is None and by_role["scp trusted CA"]["days_left"] > 300
    metrics = {f.name: f for f in text_string_to_metric_families(httpx.get(http_url(node) + "/metrics", timeout=30).text)}
    expiry = {s.labels["role"]: s.value for s in metrics["anatomix_tls_certificate_expiry_timestamp_seconds"].samples}
    assert set(expiry) == {"scp certificate", "scp trusted CA"}
    assert abs(expiry["scp certificate"] - datetime.fromisoformat(scp["not_after"]).timestamp()) < 1
    assert 19 * 86400 <= expiry["scp certificate"] - time.time() <= 20 * 86400
    assert metrics["anatomix_tls_certificate_unreadable"].samples == []


def test_tls_only_node_does_not_listen_on_the_plain_port(tmp_path: Path, ca: TestCa, client: Issued) -> None:
    node = tls_node(tmp_path / "node", ca, ca.issue("tls only", server=True), plain_port=False).start()
    try:
        assert f"TLS port {tls_port(node)} only" in node.log_text()
        assert echo(tls_port(node), *dcmtk_tls(ca, client)).returncode == 0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", node.port), timeout=5).close()
    finally:
        node.stop()


def test_an_unusable_key_stops_serve_with_one_line(tmp_path: Path, ca: TestCa, client: Issued) -> None:
    server = ca.issue("node", server=True)
    node = tls_node(tmp_path / "node", ca, server, private_key=str(client.key))  # another certificate's key
    with pytest.raises(RuntimeError, match="exited with 2") as failure:
        node.start()
    assert "cannot be used" in str(failure.value) and "Traceback" not in node.log_text()
