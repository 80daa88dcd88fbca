"""ATNA forwarding end to end: a real node (``serve``), DCMTK senders, and a real syslog receiver
(tests/support/syslog_listener.py: TCP with RFC 6587 octet counting, or TLS per RFC 5425).

- an unknown AE's rejection reaches the repository as a Security Alert with the reason;
- every frame parses as RFC 5424 and every payload passes the PS3.15 A.5.1 checks;
- with the repository down (refusing, or accepting and never reading) C-STORE still completes,
  and once it is back every event arrives: the ids match the audit table, none is lost, and any
  duplicate is the same event id (at-least-once, de-duplicated by id).
"""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dicom_node.audit.atna import MSGID, SD_ID
from dicom_node.audit.forward import AuditForwarder
from dicom_node.audit.trail import AuditTrail, Peer
from dicom_node.settings import load_settings
from dicom_node.store import open_store
from tests.support.atna_schema import audit_message_errors
from tests.support.corpus import write_synthetic_set
from tests.support.dcmtk import echoscu, storescu
from tests.support.net import free_port
from tests.support.node import NodeProcess
from tests.support.syslog_listener import SyslogListener, parse_rfc5424

PATIENT_ID = "SYNTH-0001"  # what write_synthetic_set puts in every file


def _wait(condition, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _parsed(listener: SyslogListener) -> list:
    messages = []
    for raw in listener.messages():
        message = parse_rfc5424(raw)
        assert message.msg.startswith(b"\xef\xbb\xbf<?xml"), message.msg[:40]  # BOM + UTF-8 XML (RFC 5424 6.4)
        errors = audit_message_errors(message.msg[3:])
        assert errors == [], (errors, message.msg.decode("utf-8", "replace"))
        messages.append(message)
    return messages


def _store_ids(node: NodeProcess) -> list[int]:
    store = node.open_store()
    try:
        return [int(e.id) for e in store.query_audit_events()]
    finally:
        store.close()


def _outbox(node: NodeProcess) -> int:
    store = node.open_store()
    try:
        return store.audit_outbox_size()
    finally:
        store.close()


def _node(tmp_path: Path, port: int, **audit_keys) -> NodeProcess:
    node = NodeProcess(tmp_path / "node", settings={"audit": {
        "syslog_host": "127.0.0.1", "syslog_port": port, "transport": "tcp", "enterprise_site_id": "HOSPITAL-1",
        "retry_max_s": 1.0, **audit_keys}})  # fmt: skip
    node.add_source("modality", "MODALITY")
    return node


def test_rejection_and_transfer_reach_the_repository_as_rfc5424_dicom_audit_messages(tmp_path: Path) -> None:
    listener = SyslogListener(free_port()).start()
    node = _node(tmp_path, listener.port)
    node.start()
    try:
        rejected = echoscu(node.port, "INTRUDER", "ANATOMIX")
        assert rejected.returncode != 0
        files = write_synthetic_set(tmp_path / "in", 3, study_uid="1.2.826.0.1.3680043.8.498.71")
        t0 = time.monotonic()
        assert storescu(node.port, files, "MODALITY", "ANATOMIX").returncode == 0
        print(f"push of 3 with the repository up: {time.monotonic() - t0:.2f} s")
        _wait(lambda: _outbox(node) == 0 and len(listener.messages()) >= 4, what="forwarded events")
    finally:
        node.stop()
    listener.stop()
    # Recorded after the forwarder stopped: still queued (durably), it goes with the next start.
    store = node.open_store()
    try:
        assert [e.event for e in store.audit_outbox()] == ["application_stopped"]
        stop_id = store.audit_outbox()[0].id
        (row,) = store.query_audit_events(events=("association_rejected",), ae="INTRUDER")
    finally:
        store.close()
    assert "is not a configured source" in row.detail["reason"] and row.peer_host == "127.0.0.1"
    messages = _parsed(listener)
    assert listener.framing_errors == []
    for m in messages:
        assert (m.facility, m.version, m.msgid, m.app_name) == (10, 1, MSGID, "anatomix-node")
        assert m.severity in (4, 5) and m.timestamp.endswith("Z") and m.procid.isdigit()
    by_event = {}
    for m in messages:
        by_event.setdefault(m.structured_data[SD_ID]["event"], []).append(m)
    # The unknown AE: a Security Alert (Node Authentication, minor failure) with the reason, as a warning.
    (alert,) = by_event["association_rejected"]
    xml = alert.msg.decode("utf-8")
    assert 'csd-code="110113"' in xml and 'csd-code="110126"' in xml and 'EventOutcomeIndicator="4"' in xml
    assert "INTRUDER" in xml and "is not a configured source" in xml
    assert alert.severity == 4
    # The push: DICOM Instances Transferred naming the study and the patient; start and stop of the node.
    released = [m for m in by_event["association_released"] if b'csd-code="110104"' in m.msg]
    assert len(released) == 1 and PATIENT_ID.encode() in released[0].msg and b"HOSPITAL-1" in released[0].msg
    assert {"application_started", "association_accepted"} <= set(by_event)
    # Count and ids: exactly the audit table's, each once (nothing queued was lost or doubled).
    ids = [int(m.structured_data[SD_ID]["eventId"]) for m in messages]
    assert sorted(ids) == [i for i in _store_ids(node) if i != stop_id]
    # The patient ID went to the repository, not into the node's log.
    assert PATIENT_ID not in node.log_text()


def test_repository_down_during_a_push_loses_nothing_and_does_not_block_c_store(tmp_path: Path) -> None:
    port = free_port()  # nothing listens: the repository is down (connection refused)
    node = _node(tmp_path, port, timeout_s=60.0)
    node.start()
    hung = SyslogListener(port)
    listener = SyslogListener(port)
    try:
        files = write_synthetic_set(tmp_path / "in1", 5, study_uid="1.2.826.0.1.3680043.8.498.72")
        t0 = time.monotonic()
        assert storescu(node.port, files, "MODALITY", "ANATOMIX").returncode == 0
        print(f"push of 5 with the repository refusing: {time.monotonic() - t0:.2f} s")
        _wait(lambda: len(node.spooled_files()) == 5, what="5 stored")
        _wait(lambda: "audit forwarding to 127.0.0.1" in node.log_text(), what="a failed forwarding try")
        queued_while_down = _outbox(node)
        assert queued_while_down >= 3  # started, accepted, released at least

        # The repository comes back hung: it accepts and reads nothing. C-STORE is not held up by it.
        hung.stall()
        hung.start()
        _wait(lambda: hung.connections >= 1, what="the forwarder connected to the hung repository")
        more = write_synthetic_set(tmp_path / "in2", 4, study_uid="1.2.826.0.1.3680043.8.498.73")
        t0 = time.monotonic()
        assert storescu(node.port, more, "MODALITY", "ANATOMIX").returncode == 0
        print(f"push of 4 with the repository hung: {time.monotonic() - t0:.2f} s")  # a figure, not an assert
        _wait(lambda: len(node.spooled_files()) == 9, what="9 stored")
        assert hung.messages() == [] and _outbox(node) >= queued_while_down
        # It dies without reading what was sent: unconfirmed, so still queued.
        hung.stop()
        assert _outbox(node) >= queued_while_down

        listener.start()
        _wait(lambda: _outbox(node) == 0, timeout=120, what="the outbox drained")
    finally:
        node.stop()
        hung.stop()
        listener.stop()
    store = node.open_store()
    try:
        assert [e.event for e in store.audit_outbox()] == ["application_stopped"]  # recorded after the forwarder stopped
        stop_id = store.audit_outbox()[0].id
        recorded = {int(e.id) for e in store.query_audit_events()} - {stop_id}
        released = store.query_audit_events(events=("association_released",))
    finally:
        store.close()
    assert sum(e.detail["received"] for e in released) == 9
    ids = _parsed_ids(listener)
    assert set(ids) == recorded  # every event recorded while the repository was down or hung arrived
    duplicates = sum(n - 1 for n in Counter(ids).values())
    print(f"{len(ids)} frames, {len(set(ids))} distinct events, {duplicates} duplicate(s)")
    assert duplicates == 0  # nothing reached the hung repository, so nothing needed sending twice
    _parsed(listener)  # and every one is a valid message


def _parsed_ids(listener: SyslogListener) -> list[int]:
    return [int(parse_rfc5424(raw).structured_data[SD_ID]["eventId"]) for raw in listener.messages()]


def test_forwarding_over_tls_rfc5425(tmp_path: Path) -> None:
    import ssl

    cert, key = tmp_path / "repo.crt", tmp_path / "repo.key"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    listener = SyslogListener(free_port(), ssl_context=server).start()
    config = tmp_path / "node.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{tmp_path / "var"}"\n[audit]\nsyslog_host = "127.0.0.1"\nsyslog_port = {listener.port}\n'
        f'transport = "tls"\nca_file = "{cert}"\n'
    )
    settings = load_settings(config)
    (tmp_path / "var").mkdir()
    store = open_store(settings.database_url)
    try:
        store.set_audit_forwarding("tls://127.0.0.1")
        trail = AuditTrail(store)
        for n in range(5):
            trail.record("association_rejected", Peer(f"EVIL{n}", "ANATOMIX", "10.0.0.7"), reason="calling AE not configured")
        forwarder = AuditForwarder(settings, store)
        assert forwarder.forward(store.audit_outbox()) is True
        assert store.audit_outbox_size() == 0
        # A repository whose certificate we do not trust gets nothing, and the events stay queued.
        trail.record("association_rejected", Peer("EVIL9", "ANATOMIX", "10.0.0.7"), reason="calling AE not configured")
        untrusting = AuditForwarder(settings.with_overrides(audit={"ca_file": ""}), store)
        assert untrusting.forward(store.audit_outbox()) is False
        assert store.audit_outbox_size() == 1
    finally:
        store.close()
        listener.stop()
    messages = _parsed(listener)
    assert [m.structured_data[SD_ID]["eventId"] for m in messages] == ["1", "2", "3", "4", "5"]
    assert listener.framing_errors == [] or all(
        "certificate" in e.lower() or "unknown ca" in e.lower() or "alert" in e.lower() for e in listener.framing_errors
    )


@pytest.mark.parametrize("bad", [{"transport": "udp"}, {"syslog_port": 70000}, {"cert_file": "/x.pem"}, {"app_name": "has space"}])
def test_bad_audit_settings_name_the_key(tmp_path: Path, bad: dict) -> None:
    from dicom_node.settings import SettingsError

    config = tmp_path / "node.toml"
    config.write_text("[audit]\n" + "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in bad.items()))
    with pytest.raises(SettingsError, match=f"audit.{next(iter(bad))}"):
        load_settings(config)


def test_the_outbox_spans_processes(tmp_path: Path) -> None:
    """An event recorded by another process (a CLI command) is queued too: the switch is in the store."""
    url = f"sqlite:///{tmp_path / 'a.db'}"
    first, second = open_store(url), open_store(url)
    try:
        first.set_audit_forwarding("tcp://repo:601")
        AuditTrail(second).record("admin_change", None, user="bob", what="remote_node.add", target="x")
        assert [e.event for e in first.audit_outbox()] == ["admin_change"]
        assert first.audit_outbox()[0].at <= datetime.now(UTC)
    finally:
        first.close()
        second.close()
