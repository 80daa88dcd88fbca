"""DICOM TLS: the guarded SCP's TLS port in-process against real DCMTK clients, delivery and echo over TLS
to a real DCMTK ``storescp +tls``, the per-node TLS columns (SQLite and PostgreSQL), ``ae add/update
--tls*``, ``tls status`` and the settings checks.

Certificates come from throw-away CAs made in each test (:mod:`tests.support.pki`).
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pydicom
import pytest

from dicom_node.audit import trail as audit
from dicom_node.audit.trail import open_audit_trail
from dicom_node.net.scp import StorageScp
from dicom_node.net.server import InheritedSocketServer, make_scp_servers, open_listening_socket
from dicom_node.net.tls import TlsConfigError, certificate_status, client_tls_args, server_context
from dicom_node.pipeline.delivery import OutgoingObject, send_objects
from dicom_node.settings import Settings, SettingsError
from dicom_node.store import open_store
from dicom_node.store.base import RemoteNode, Store
from tests.support.corpus import write_synthetic_set
from tests.support.dcmtk import StoreScp, run_dcmtk
from tests.support.net import free_port
from tests.support.node import NODE_COMMAND, REPO_ROOT
from tests.support.pki import Issued, TestCa
from tests.support.postgres import postgres_server, postgres_url, start_private_server  # noqa: F401 (fixtures)
from tests.support.raw_pdu import wait_closed
from tests.support.stores import store_url  # noqa: F401 (fixtures)

STUDY = "1.2.826.0.1.3680043.10.1431.77"


@dataclass
class Pki:
    ca: TestCa
    server: Issued
    client: Issued
    rogue_client: Issued  # signed by a CA the node does not trust


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = TestCa(tmp_path / "pki", "Hospital CA")
    rogue = TestCa(tmp_path / "pki-rogue", "Rogue CA")
    return Pki(ca, ca.issue("anatomix node", server=True), ca.issue("modality", server=False), rogue.issue("intruder", server=False))


def tls_settings(tmp_path: Path, pki: Pki, **tls: object) -> Settings:
    return Settings().with_overrides(
        node={"port": free_port(), "bind_address": "127.0.0.1", "network_timeout_s": 10.0},
        storage={"data_dir": tmp_path / "var", "min_free_bytes": 0},
        limits={"establish_timeout_s": 6.0},
        tls={
            "enabled": True, "port": free_port(), "certificate": pki.server.certificate, "private_key": pki.server.key,
            "ca_certificates": pki.ca.cert_path, **tls,
        },
    )  # fmt: skip


@dataclass
class TlsScp:
    settings: Settings
    store: Store
    scp: StorageScp
    servers: list[InheritedSocketServer]

    @property
    def plain_port(self) -> int:
        return self.settings.node.port

    @property
    def tls_port(self) -> int:
        return self.settings.tls.port

    def connection_count(self, kind: str, expected: int, timeout: float = 15.0) -> int:
        """How many connections of ``kind`` the aggregated audit has recorded, once it reaches
        ``expected`` or ``timeout`` passes (the handler thread notes a refusal after the client left)."""
        deadline = time.monotonic() + timeout
        while True:
            self.scp.aggregate.flush()
            rows = self.store.list_audit_events(audit.CONNECTIONS_SUMMARY)
            count = sum(int(row.detail["count"]) for row in rows if row.detail["kind"] == kind)
            if count >= expected or time.monotonic() > deadline:
                return count
            time.sleep(0.05)


def start_tls_scp(tmp_path: Path, settings: Settings) -> TlsScp:
    (tmp_path / "var" / "spool" / ".tmp").mkdir(parents=True)
    store = open_store(f"sqlite:///{tmp_path / 'var' / 'anatomix.db'}")
    store.add_remote_node(RemoteNode(name="modality", ae_title="MODALITY", host="127.0.0.1", port=104, role="source"))
    scp = StorageScp(settings, store, open_audit_trail(store, ""))
    plain = open_listening_socket("127.0.0.1", settings.node.port)
    secure = open_listening_socket("127.0.0.1", settings.tls.port)
    servers = make_scp_servers(settings, scp, [(plain, None), (secure, server_context(settings))])
    for server in servers:
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    return TlsScp(settings, store, scp, servers)


@pytest.fixture
def tls_scp(tmp_path: Path, pki: Pki) -> Iterator[TlsScp]:
    running = start_tls_scp(tmp_path, tls_settings(tmp_path, pki))
    yield running
    for server in running.servers:
        server.shutdown()
    running.store.close()


def echoscu(port: int, *tls: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return run_dcmtk("echoscu", *tls, "-to", "20", "-aet", "MODALITY", "-aec", "ANATOMIX", "127.0.0.1", str(port), timeout=timeout)


def client_tls(pki: Pki, issued: Issued | None = None) -> tuple[str, ...]:
    """DCMTK options: our client certificate (or anonymous TLS), the node's CA trusted."""
    issued = issued or pki.client
    return ("+tls", str(issued.key), str(issued.certificate), "+cf", str(pki.ca.cert_path))


def half_client_hello() -> bytes:
    """The first half of a real TLS ClientHello (what a client that stalls mid-handshake has sent)."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[0] == 0x16 and len(hello) > 100  # a handshake record
    return hello[: len(hello) // 2]


# ---- the SCP's TLS port --------------------------------------------------------------------------------


def test_dcmtk_echo_and_store_over_tls_with_a_trusted_client_certificate(tls_scp: TlsScp, pki: Pki, tmp_path: Path) -> None:
    result = echoscu(tls_scp.tls_port, *client_tls(pki))
    assert result.returncode == 0, result.stderr
    files = write_synthetic_set(tmp_path / "in", 2, study_uid=STUDY)
    sent = run_dcmtk(
        "storescu", *client_tls(pki), "-aet", "MODALITY", "-aec", "ANATOMIX", "127.0.0.1", str(tls_scp.tls_port),
        *[str(f) for f in files], timeout=120,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    received = {pydicom.dcmread(p).SOPInstanceUID for p in (tmp_path / "var" / "spool").rglob("*.dcm")}
    assert received == {pydicom.dcmread(f).SOPInstanceUID for f in files}
    # The plain port beside it still serves plain DICOM; the TLS port does not speak plain DICOM.
    assert echoscu(tls_scp.plain_port).returncode == 0
    assert echoscu(tls_scp.tls_port).returncode != 0
    assert tls_scp.connection_count("tls_handshake_failed", 1) == 1


def test_clients_without_a_trusted_certificate_are_refused(tls_scp: TlsScp, pki: Pki) -> None:
    anonymous = echoscu(tls_scp.tls_port, "+tla", "+cf", str(pki.ca.cert_path))
    rogue = echoscu(tls_scp.tls_port, *client_tls(pki, pki.rogue_client))
    assert anonymous.returncode != 0 and rogue.returncode != 0
    assert len(tls_scp.store.list_audit_events(audit.ASSOCIATION_ACCEPTED)) == 0
    assert tls_scp.connection_count("tls_handshake_failed", 2) == 2
    assert echoscu(tls_scp.tls_port, *client_tls(pki)).returncode == 0  # and the node keeps serving


def test_client_certificates_optional_when_not_required(tmp_path: Path, pki: Pki) -> None:
    running = start_tls_scp(tmp_path, tls_settings(tmp_path, pki, require_client_certificate=False))
    try:
        assert echoscu(running.tls_port, "+tla", "+cf", str(pki.ca.cert_path)).returncode == 0
        assert echoscu(running.tls_port, *client_tls(pki)).returncode == 0
        # Presented but untrusted is still refused.
        assert echoscu(running.tls_port, *client_tls(pki, pki.rogue_client)).returncode != 0
    finally:
        for server in running.servers:
            server.shutdown()
        running.store.close()


def test_a_stalled_tls_handshake_blocks_no_one_and_is_closed_at_the_deadline(tls_scp: TlsScp, pki: Pki) -> None:
    """pynetdicom's own server does the handshake in its accept loop: there, a client that connects
    and sends nothing (or half a ClientHello) stops every later connection. Here the handshake runs
    in the connection's thread under ``limits.establish_timeout_s`` (6 s in this test)."""
    silent = socket.create_connection(("127.0.0.1", tls_scp.tls_port))
    half = socket.create_connection(("127.0.0.1", tls_scp.tls_port))
    half.sendall(half_client_hello())
    # Both stalled handshakes are open while a good client associates on the same port (an
    # accept-loop handshake would leave echoscu waiting: the subprocess timeout would fail the test).
    try:
        good = echoscu(tls_scp.tls_port, *client_tls(pki), timeout=60)
        assert good.returncode == 0, good.stderr
        assert wait_closed(silent, 0.05) is None and wait_closed(half, 0.05) is None  # not yet at the deadline
        assert wait_closed(silent, 30) is not None and wait_closed(half, 30) is not None
    finally:
        silent.close()
        half.close()
    assert tls_scp.connection_count("tls_handshake_timed_out", 2) == 2


# ---- delivery and echo over TLS to DCMTK storescp +tls ---------------------------------------------------


@pytest.fixture
def tls_storescp(tmp_path: Path, pki: Pki) -> Iterator[StoreScp]:
    receiver_cert = pki.ca.issue("pacs", server=True)
    receiver = StoreScp(
        tmp_path / "pacs", ae_title="PACS",
        extra=("+tls", str(receiver_cert.key), str(receiver_cert.certificate), "+cf", str(pki.ca.cert_path), "-rc"),
    ).start()  # fmt: skip
    yield receiver
    receiver.stop()


def destination(port: int, pki: Pki, **tls: object) -> RemoteNode:
    return RemoteNode(
        name="pacs", ae_title="PACS", host="localhost", port=port, role="destination", tls=True,
        tls_ca_file=str(pki.ca.cert_path), tls_cert_file=str(pki.client.certificate), tls_key_file=str(pki.client.key), **tls,
    )  # fmt: skip


def outgoing(directory: Path, count: int) -> list[OutgoingObject]:
    objects = []
    for path in write_synthetic_set(directory, count, study_uid=STUDY):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        objects.append(OutgoingObject(ds.SOPInstanceUID, ds.SOPClassUID, "sc", path))
    return objects


def send(node: RemoteNode, objects: list[OutgoingObject]):
    return send_objects(node, objects, calling_ae="ANATOMIX", timeout_s=20, fallback=lambda ds: ds)


def test_delivery_sends_over_tls_to_dcmtk_storescp(tls_storescp: StoreScp, pki: Pki, tmp_path: Path) -> None:
    objects = outgoing(tmp_path / "out", 2)
    outcomes = send(destination(tls_storescp.port, pki), objects)
    assert [o.status for o in outcomes] == [0x0000, 0x0000], outcomes
    received = {pydicom.dcmread(p).SOPInstanceUID for p in tls_storescp.output_dir.rglob("*") if p.is_file()}
    assert received == {o.sop_instance_uid for o in objects}


def test_delivery_over_tls_fails_without_our_certificate_or_with_an_untrusted_receiver(tls_storescp: StoreScp, pki: Pki, tmp_path: Path) -> None:
    objects = outgoing(tmp_path / "out", 1)
    no_client_cert = replace(destination(tls_storescp.port, pki), tls_cert_file=None, tls_key_file=None)
    (refused,) = send(no_client_cert, objects)
    assert refused.status is None and refused.outcome == "transient" and "no association" in (refused.error or "")
    other_ca = TestCa(tmp_path / "other", "Other CA")
    (untrusted,) = send(replace(destination(tls_storescp.port, pki), tls_ca_file=str(other_ca.cert_path)), objects)
    assert untrusted.status is None and untrusted.outcome == "transient"
    (missing,) = send(replace(destination(tls_storescp.port, pki), tls_key_file=str(tmp_path / "nope.pem")), objects)
    assert missing.outcome == "permanent" and "no such file" in (missing.error or "")
    assert not [p for p in tls_storescp.output_dir.rglob("*") if p.is_file()]
    (sent,) = send(destination(tls_storescp.port, pki), objects)  # the receiver is fine: it was the TLS setup
    assert sent.status == 0x0000


def node_cli(site: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*NODE_COMMAND, *args, "--config", str(site / "anatomix-node.toml")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    assert subprocess.run([*NODE_COMMAND, "init", "--dir", str(site)], cwd=REPO_ROOT, capture_output=True, timeout=120).returncode == 0
    return site


def test_ae_add_update_tls_then_echo_over_tls(site: Path, tls_storescp: StoreScp, pki: Pki) -> None:
    added = node_cli(site, "ae", "add", "pacs", "--ae-title", "PACS", "--host", "localhost", "--port", str(tls_storescp.port),
                     "--role", "destination", "--tls", "--tls-ca", str(pki.ca.cert_path))  # fmt: skip
    assert added.returncode == 0, added.stderr
    refused = node_cli(site, "echo", "pacs", "--timeout", "10")  # storescp requires our client certificate
    assert refused.returncode == 2 and "TLS" in refused.stderr and "--tls-cert" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    updated = node_cli(site, "ae", "update", "pacs", "--tls-cert", str(pki.client.certificate), "--tls-key", str(pki.client.key))
    assert updated.returncode == 0, updated.stderr
    echoed = node_cli(site, "echo", "pacs", "--timeout", "10")
    assert echoed.returncode == 0 and "C-ECHO success" in echoed.stdout, echoed.stderr
    (listed,) = json.loads(node_cli(site, "ae", "list", "--json").stdout)
    assert listed["tls"] is True and listed["tls_verify_peer"] is True
    assert listed["tls_ca_file"] == str(pki.ca.cert_path.resolve()) and listed["tls_key_file"] == str(pki.client.key.resolve())
    assert "tls" in node_cli(site, "ae", "list").stdout
    half = node_cli(site, "ae", "update", "pacs", "--tls-key", "")
    assert half.returncode == 2 and "--tls-cert and --tls-key go together" in half.stderr
    plain = node_cli(site, "ae", "update", "pacs", "--no-tls")
    assert plain.returncode == 2 and "need --tls" in plain.stderr
    assert node_cli(site, "ae", "update", "pacs", "--no-tls-verify").returncode == 0
    (listed,) = json.loads(node_cli(site, "ae", "list", "--json").stdout)
    assert listed["tls_verify_peer"] is False


def test_ae_add_tls_refuses_a_missing_file(site: Path) -> None:
    result = node_cli(site, "ae", "add", "pacs", "--ae-title", "PACS", "--host", "localhost", "--port", "104",
                      "--role", "destination", "--tls", "--tls-ca", "/nonexistent/ca.pem")  # fmt: skip
    assert result.returncode == 2 and "--tls-ca /nonexistent/ca.pem: no such file" in result.stderr


# ---- certificate expiry -----------------------------------------------------------------------------------


def test_tls_status_lists_not_after_and_warns_within_30_days(site: Path, pki: Pki) -> None:
    short = pki.ca.issue("expiring node", server=True, days=10)
    config = site / "anatomix-node.toml"  # init wrote a [tls] table (all keys commented): set keys in it
    config.write_text(config.read_text().replace("\n[tls]\n", f'\n[tls]\nenabled = true\nport = {free_port()}\ncertificate = "{short.certificate}"\n'
                                                 f'private_key = "{short.key}"\nca_certificates = "{pki.ca.cert_path}"\n', 1))  # fmt: skip
    assert node_cli(site, "ae", "add", "pacs", "--ae-title", "PACS", "--host", "localhost", "--port", "104", "--role", "destination",
                    "--tls", "--tls-cert", str(pki.client.certificate), "--tls-key", str(pki.client.key)).returncode == 0  # fmt: skip
    result = node_cli(site, "tls", "status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    by_role = {c["role"]: c for c in report["certificates"]}
    assert set(by_role) == {"scp certificate", "scp trusted CA", "remote pacs client certificate"}
    assert by_role["scp certificate"]["not_after"] == short.not_after.isoformat(timespec="seconds")
    assert 9 <= by_role["scp certificate"]["days_left"] <= 10
    assert "expires in" in by_role["scp certificate"]["warning"]
    assert by_role["remote pacs client certificate"]["not_after"] == pki.client.not_after.isoformat(timespec="seconds")
    assert by_role["remote pacs client certificate"]["warning"] is None
    text = node_cli(site, "tls", "status")
    assert "CN=expiring node" in text.stdout and "warning:" in text.stderr and "expires in" in text.stderr


def test_certificate_status_reports_expired_and_unreadable_files(tmp_path: Path, pki: Pki) -> None:
    expired = pki.ca.issue("old", server=True, days=-2)
    settings = tls_settings(tmp_path, pki, certificate=expired.certificate, ca_certificates=tmp_path / "missing.pem")
    statuses = certificate_status(settings)
    assert statuses[0].days_left is not None and statuses[0].days_left < 0
    assert "EXPIRED" in (statuses[0].warning(30) or "")
    assert statuses[1].error is not None and "cannot read" in statuses[1].error


# ---- settings and contexts ---------------------------------------------------------------------------------


def test_tls_settings_are_checked(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(SettingsError, match="needs tls.certificate"):
        Settings().with_overrides(tls={"enabled": True})
    with pytest.raises(SettingsError, match="needs tls.ca_certificates"):
        Settings().with_overrides(tls={"enabled": True, "certificate": "c.pem", "private_key": "k.pem"})
    with pytest.raises(SettingsError, match="the same as node.port"):
        Settings().with_overrides(tls={"enabled": True, "port": 11112, "certificate": "c", "private_key": "k", "ca_certificates": "a"})
    with pytest.raises(SettingsError, match="TLSv1.2 or TLSv1.3"):
        Settings().with_overrides(tls={"min_version": "TLSv1.1"})
    mismatched = tls_settings(tmp_path, pki, private_key=pki.client.key)
    with pytest.raises(TlsConfigError, match="cannot be used"):
        server_context(mismatched)
    context = server_context(tls_settings(tmp_path, pki))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2 and context.verify_mode == ssl.CERT_REQUIRED
    assert all("GCM" in c["name"] or "CHACHA20" in c["name"] for c in context.get_ciphers())
    args = client_tls_args(destination(104, pki))
    assert args is not None and args[1] == "localhost" and args[0].check_hostname
    assert client_tls_args(replace(destination(104, pki), tls=False)) is None


def test_remote_node_tls_columns_round_trip(store_url: str, pki: Pki) -> None:
    store = open_store(store_url)
    try:
        node = destination(2762, pki)
        store.add_remote_node(node)
        assert store.get_remote_node("pacs") == node
        changed = replace(node, tls_ca_file=None, tls_verify_peer=False)
        store.update_remote_node(changed)
        assert store.list_remote_nodes() == [changed]
        store.add_remote_node(RemoteNode(name="plain", ae_title="P", host="h", port=104))
        assert store.get_remote_node("plain").tls_verify_peer is True  # the column's default
    finally:
        store.close()
