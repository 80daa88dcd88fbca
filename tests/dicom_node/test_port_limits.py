"""The guarded SCP server in-process: connection gate, size caps, honest audit, escaping, idle wake-ups.

Real SQLite store, the node's StorageScp and guarded server (``make_scp_server``) on a loopback
socket, real pynetdicom SCUs and raw sockets for the misbehaving clients.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from unittest import mock

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

from dicom_node.audit import trail as audit
from dicom_node.audit.trail import AggregatedAudit, open_audit_trail
from dicom_node.logging_setup import escape_controls
from dicom_node.net.gate import ConnectionGate, Ticket
from dicom_node.net.guard import GuardedSocket, IdleCheckpoint
from dicom_node.net.scp import StorageScp
from dicom_node.net.server import InheritedSocketServer, make_scp_server, open_listening_socket
from dicom_node.settings import LimitsSettings, Settings, SettingsError
from dicom_node.store import open_store
from dicom_node.store.base import RemoteNode, Store
from tests.support.corpus import write_synthetic_set
from tests.support.net import free_port
from tests.support.raw_pdu import associate_rq, connect_from, pdu_header, read_pdu, wait_closed

A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ABORT = 0x02, 0x03, 0x07


@dataclass
class GuardedScp:
    settings: Settings
    store: Store
    scp: StorageScp
    server: InheritedSocketServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.settings.node.port

    def audit_rows(self, event: str) -> list[audit.AuditEvent]:
        return self.store.list_audit_events(event)


def start_guarded(tmp_path: Path, **limits: object) -> GuardedScp:
    port = free_port()
    settings = Settings().with_overrides(
        node={"port": port, "bind_address": "127.0.0.1", "network_timeout_s": 5.0},
        storage={"data_dir": tmp_path / "var", "min_free_bytes": 0},
        limits={"establish_timeout_s": 2.0, **limits},
    )
    (tmp_path / "var" / "spool" / ".tmp").mkdir(parents=True)
    store = open_store(f"sqlite:///{tmp_path / 'var' / 'anatomix.db'}")
    store.add_remote_node(RemoteNode(name="modality", ae_title="MODALITY", host="127.0.0.1", port=104, role="source"))
    trail = open_audit_trail(store, "")
    scp = StorageScp(settings, store, trail)
    listen = open_listening_socket("127.0.0.1", port)
    server = make_scp_server(settings, scp, listen)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    return GuardedScp(settings, store, scp, server, thread)


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[GuardedScp]:
    running = start_guarded(tmp_path)
    yield running
    running.server.shutdown()
    running.thread.join(timeout=10)
    running.store.close()


def associate(port: int, calling: str = "MODALITY"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(ComputedRadiographyImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    return ae.associate("127.0.0.1", port, ae_title="ANATOMIX")


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# ---- settings and pure parts -------------------------------------------------------------------------


def test_limits_defaults_and_validation() -> None:
    limits = Settings().limits
    assert limits.max_associate_rq_bytes == 65536 and limits.establish_timeout_s == 10.0
    assert Settings().node.bind_address == "127.0.0.1"
    with pytest.raises(SettingsError, match="limits.reserved_connections"):
        Settings().with_overrides(limits={"max_connections": 4, "reserved_connections": 4})
    with pytest.raises(SettingsError, match="limits.trusted_hosts"):
        Settings().with_overrides(limits={"trusted_hosts": ("not-an-ip",)})


def test_gate_reserves_slots_for_trusted_hosts_and_limits_each_host() -> None:
    gate = ConnectionGate(LimitsSettings(max_connections=6, reserved_connections=2, max_connections_per_host=3, trusted_hosts=("10.9.0.0/16",)))
    gate.set_trusted_ips({"192.0.2.1"})
    tickets = [gate.admit("198.51.100.1") for _ in range(3)]
    assert all(not isinstance(t, str) for t in tickets)
    assert gate.admit("198.51.100.1") == "refused_per_host_limit"
    tickets.append(gate.admit("198.51.100.2"))
    assert gate.admit("198.51.100.3") == "refused_reserved"  # 4 of 6 used: the last 2 are reserved
    trusted = [gate.admit("192.0.2.1"), gate.admit("10.9.4.4")]
    assert all(not isinstance(t, str) for t in trusted)
    assert gate.admit("192.0.2.1") == "refused_total_limit"
    for ticket in tickets + trusted:
        ticket.release()  # type: ignore[union-attr]
        ticket.release()  # type: ignore[union-attr]  # idempotent
    assert gate.open_connections == 0


def test_gate_sheds_the_oldest_connection_without_a_whole_associate_rq_for_a_newcomer_at_a_limit() -> None:
    """Issue 26: at a limit the newcomer takes the slot of the oldest connection it may displace that
    has not sent a whole A-ASSOCIATE-RQ (read or waiting unread); none such: refused as before."""
    gate = ConnectionGate(LimitsSettings(max_connections=4, reserved_connections=1, max_connections_per_host=2))
    gate.set_trusted_ips({"127.0.0.1"})
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    opened: list[tuple[socket.socket, socket.socket]] = []

    def connect(host: str, send: bytes = b"") -> tuple[socket.socket, Ticket | str]:
        client = connect_from(host, port)
        if send:
            client.sendall(send)
        server, _ = listener.accept()
        opened.append((client, server))
        time.sleep(0.05 if send else 0.001)  # loopback delivery of what was sent
        return client, gate.admit(host, server)

    try:
        first, _ = connect("127.0.0.1")  # idle: the oldest
        whole, _ = connect("127.0.0.1", associate_rq("MODALITY"))  # its whole RQ waits unread: safe
        half, _ = connect("127.0.0.1", associate_rq("MODALITY")[:40])
        fourth, _ = connect("127.0.0.1")
        assert gate.open_connections == 4
        _, newcomer = connect("127.0.0.1")  # at the total: the oldest idle one goes, not the one with a whole RQ
        assert isinstance(newcomer, Ticket) and wait_closed(first, 5) is not None
        _, again = connect("127.0.0.1")
        assert isinstance(again, Ticket) and wait_closed(half, 5) is not None  # a half RQ is not a whole one
        assert gate.open_connections == 4 and gate.pending_connections == 4
        for ticket in (newcomer, again):
            assert ticket.associating()  # read whole: never shed after this
        _, third = connect("127.0.0.1")
        assert isinstance(third, Ticket) and wait_closed(fourth, 5) is not None
        # A host that is not a source never takes a source's slot: refused.
        assert connect("127.0.0.9")[1] == "refused_total_limit"
        assert wait_closed(whole, 0.2) is None  # still open: its RQ is all there
    finally:
        for client, server in opened:
            client.close()
            server.close()
        listener.close()

    # Hosts that are not sources: at the per-host limit only the same host's connections make room.
    gate = ConnectionGate(LimitsSettings(max_connections=8, reserved_connections=2, max_connections_per_host=2))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        a1, _ = connect("127.0.0.2")
        b1, _ = connect("127.0.0.3")
        connect("127.0.0.2")
        assert isinstance(connect("127.0.0.2")[1], Ticket) and wait_closed(a1, 5) is not None
        assert wait_closed(b1, 0.2) is None
    finally:
        for client, server in opened:
            client.close()
            server.close()
        listener.close()


def test_escape_controls_leaves_no_control_character() -> None:
    escaped = escape_controls("EVIL\nFAKE\x1b[31m\x00\x7f\u2028ok")
    assert escaped == "EVIL\\x0aFAKE\\x1b[31m\\x00\\x7f\\u2028ok"
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in escaped)


def test_aggregated_audit_names_the_costliest_hosts_and_bounds_rows_per_window(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'a.db'}")

    def rows(event: str = audit.CONNECTIONS_SUMMARY) -> list[tuple[str | None, str | None, int, bool]]:
        found = store.list_audit_events(event, limit=100_000)
        return sorted((r.peer_host, r.detail.get("kind"), r.detail["count"], bool(r.detail.get("at_threshold"))) for r in found)

    try:
        # Named by cost, not by arrival: four hosts refused at accept come first, then two whose
        # connections held slots until the deadline; a budget of two names goes to the two holders.
        aggregate = AggregatedAudit(open_audit_trail(store, ""), window_s=60, rejections_per_host=3, hosts_per_window=2, host_threshold=1e9)
        for host in ("203.0.113.1", "203.0.113.2", "203.0.113.3", "203.0.113.4"):
            aggregate.note_connection(host, "refused_reserved")
        for host in ("203.0.113.8", "203.0.113.9"):
            aggregate.note_connection(host, "timed_out_before_association", held_s=10.0)
        assert aggregate.flush() == 3
        assert rows() == [("(other hosts)", "refused_reserved", 4, False), ("203.0.113.8", "timed_out_before_association", 1, False),
                          ("203.0.113.9", "timed_out_before_association", 1, False)]  # fmt: skip
        assert aggregate.flush() == 0  # a new window starts empty

        # Past the threshold a host's summary is written at once, then the rest at the window's end.
        store.purge_audit_events(datetime.now(UTC) + timedelta(days=1))
        aggregate = AggregatedAudit(open_audit_trail(store, ""), window_s=60, rejections_per_host=3, hosts_per_window=2, host_threshold=50)
        allowed = [aggregate.allow_rejection("203.0.113.1", f"X{i}\n") for i in range(100)]
        assert allowed == [True] * 3 + [False] * 97
        (early,) = store.list_audit_events(audit.ASSOCIATIONS_REJECTED_SUMMARY)
        assert early.detail["count"] == 47 and early.detail["at_threshold"] and len(early.detail["calling_aes"]) == 10
        assert all("\n" not in ae for ae in early.detail["calling_aes"])
        # A spray of 100 one-shot hosts cannot hide a host that keeps spending, nor can the two-name budget.
        for index in range(100):
            aggregate.note_connection(f"198.51.100.{index}", "closed_before_association")
        for host in ("192.0.2.1", "192.0.2.2"):
            for _ in range(60):
                aggregate.note_connection(host, "invalid_pdu", received=100)
        assert [r for r in rows() if r[0].startswith("192.0.2.")] == [("192.0.2.1", "invalid_pdu", 50, True), ("192.0.2.2", "invalid_pdu", 50, True)]
        written = aggregate.flush()
        named = {r[0] for r in rows() + rows(audit.ASSOCIATIONS_REJECTED_SUMMARY)}
        assert named == {"192.0.2.1", "192.0.2.2", "203.0.113.1", "(other hosts)"}
        assert sum(r[2] for r in rows() if r[0].startswith("192.0.2.")) == 120
        assert sum(r[2] for r in rows() if r[1] == "closed_before_association") == 100
        (late,) = [r for r in store.list_audit_events(audit.ASSOCIATIONS_REJECTED_SUMMARY) if not r.detail.get("at_threshold")]
        assert late.detail["count"] == 50
        assert written == 2 + 1 + 1  # two late rows for the flooders, one rejection summary, "(other hosts)"
        # Memory and rows stay bounded: 4 x hosts_per_window hosts tracked, whatever the spray.
        for index in range(5000):
            aggregate.note_connection(f"10.0.{index // 250}.{index % 250}", "refused_reserved")
        assert len(aggregate._tallies) == aggregate.tracked_hosts == 8
        assert aggregate.flush() == 3  # two named, "(other hosts)"
    finally:
        store.close()


# ---- against the running guarded server --------------------------------------------------------------


def test_known_source_still_associates_and_stores(guarded: GuardedScp, tmp_path: Path) -> None:
    files = write_synthetic_set(tmp_path / "in", 2, study_uid="1.2.826.0.1.3680043.9.7777.1", rows=512, columns=512)  # 512 KiB: PDUs at the negotiated maximum
    assoc = associate(guarded.port)
    assert assoc.is_established
    try:
        assert [assoc.send_c_store(f).Status for f in files] == [0, 0]
    finally:
        assoc.release()
    assert wait_until(lambda: len(guarded.audit_rows(audit.ASSOCIATION_RELEASED)) == 1)
    assert len(guarded.audit_rows(audit.ASSOCIATION_ACCEPTED)) == 1


def test_pynetdicom_slot_rejection_is_audited_as_rejected_and_session_freed(guarded: GuardedScp) -> None:
    guarded.server.ae.maximum_associations = 1  # pynetdicom's own slot limit below our gate's
    first = associate(guarded.port)
    assert first.is_established
    second = associate(guarded.port)
    try:
        assert second.is_rejected
        assert (second.acceptor.primitive.result, second.acceptor.primitive.result_source, second.acceptor.primitive.diagnostic) == (2, 3, 2)
        assert wait_until(lambda: len(guarded.audit_rows(audit.ASSOCIATION_REJECTED)) == 1)
        (row,) = guarded.audit_rows(audit.ASSOCIATION_REJECTED)
        assert "local limit exceeded" in row.detail["reason"] and row.calling_ae == "MODALITY"
        assert len(guarded.audit_rows(audit.ASSOCIATION_ACCEPTED)) == 1  # only the first one
        assert len(guarded.scp._sessions) == 1
    finally:
        first.release()
    assert wait_until(lambda: not guarded.scp._sessions)


def test_associate_rq_over_the_cap_is_aborted_after_the_header(guarded: GuardedScp) -> None:
    with connect_from("127.0.0.5", guarded.port) as sock:
        sock.sendall(pdu_header(0x01, 0xFFFFFFF0))  # declares 4 GiB; we send nothing more
        reply = read_pdu(sock, timeout=10)
        assert reply is not None and reply[0] == A_ABORT and reply[1][2:] == bytes([0x02, 0x06])
        assert wait_closed(sock, 5) is not None
    # The gate closes the socket before it counts the connection (its ticket is released after): wait for that.
    assert wait_until(lambda: guarded.server.guard.gate.open_connections == 0)
    guarded.scp.aggregate.flush()
    (row,) = guarded.audit_rows(audit.CONNECTIONS_SUMMARY)
    assert (row.peer_host, row.detail["kind"], row.detail["count"]) == ("127.0.0.5", "oversize_pdu", 1)


def test_p_data_tf_over_the_negotiated_maximum_is_aborted_after_the_header(guarded: GuardedScp) -> None:
    max_pdu = guarded.settings.node.max_pdu
    with connect_from("127.0.0.1", guarded.port) as sock:
        sock.sendall(associate_rq("MODALITY"))
        reply = read_pdu(sock)
        assert reply is not None and reply[0] == A_ASSOCIATE_AC
        sock.sendall(pdu_header(0x04, max_pdu + 1))  # one byte over: nothing of the body is sent
        reply = read_pdu(sock, timeout=10)
        assert reply is not None and reply[0] == A_ABORT and reply[1][2:] == bytes([0x02, 0x06])
    assert wait_until(lambda: len(guarded.audit_rows(audit.ASSOCIATION_ABORTED)) == 1)
    (row,) = guarded.audit_rows(audit.ASSOCIATION_ABORTED)
    assert f"over the negotiated maximum ({max_pdu} bytes)" in row.detail["reason"]
    assert wait_until(lambda: not guarded.scp._sessions)


def test_message_over_the_size_cap_is_aborted(tmp_path: Path) -> None:
    running = start_guarded(tmp_path, max_message_bytes=200_000)
    try:
        (big,) = write_synthetic_set(tmp_path / "in", 1, study_uid="1.2.826.0.1.3680043.9.7777.2", rows=512, columns=512)
        assoc = associate(running.port)
        assert assoc.is_established
        assoc.send_c_store(big)
        assert wait_until(lambda: assoc.is_aborted)
        assert wait_until(lambda: len(running.audit_rows(audit.ASSOCIATION_ABORTED)) == 1)
        assert "message over the size cap" in running.audit_rows(audit.ASSOCIATION_ABORTED)[0].detail["reason"]
        assert not running.settings.storage.spool_dir.joinpath(big.name).exists()
    finally:
        running.server.shutdown()
        running.thread.join(timeout=10)
        running.store.close()


def test_half_sent_pdu_is_closed_at_the_deadline_and_counted(guarded: GuardedScp) -> None:
    deadline = guarded.settings.limits.establish_timeout_s
    with connect_from("127.0.0.6", guarded.port) as sock:
        sock.sendall(associate_rq("MODALITY")[:40])  # header + a third of the body, then silence
        closed_after = wait_closed(sock, deadline + 10)
    assert closed_after is not None and deadline - 0.2 <= closed_after <= deadline + 5
    assert wait_until(lambda: guarded.server.guard.gate.open_connections == 0)
    guarded.scp.aggregate.flush()
    (row,) = guarded.audit_rows(audit.CONNECTIONS_SUMMARY)
    assert (row.detail["kind"], row.detail["count"]) == ("timed_out_before_association", 1)


def test_idle_association_wakes_tens_not_thousands_of_times_a_second(guarded: GuardedScp) -> None:
    counts = {"dul": 0, "reactor": 0}
    ready = GuardedSocket.ready.fget
    wait = IdleCheckpoint.wait

    def counting_ready(self):
        counts["dul"] += 1
        return ready(self)

    def counting_wait(self, timeout=None):
        counts["reactor"] += 1
        return wait(self, timeout)

    with mock.patch.object(GuardedSocket, "ready", property(counting_ready)), mock.patch.object(IdleCheckpoint, "wait", counting_wait):
        assoc = associate(guarded.port)
        assert assoc.is_established
        try:
            time.sleep(0.5)
            before = dict(counts)
            time.sleep(2.0)
            after = dict(counts)
            assert assoc.send_c_echo().Status == 0  # still answers at once
        finally:
            assoc.release()
    per_second = {k: (after[k] - before[k]) / 2.0 for k in counts}
    limit = 1 / guarded.settings.limits.idle_poll_s
    # pynetdicom alone: about 1000 per second per loop.
    print("wakeups per second", per_second)
    assert 0 < per_second["dul"] <= limit * 1.5 and 0 < per_second["reactor"] <= limit * 1.5, per_second


def test_audit_retention_deletes_only_rows_older_than_the_limit(tmp_path: Path) -> None:
    from datetime import datetime, timedelta

    running = start_guarded(tmp_path, audit_retention_days=30)
    try:
        running.server.housekeeping.stop()  # its own hourly purge must not race the one we call
        now = datetime.now(UTC)
        for age_days in (400, 31, 29, 0):
            running.store.audit(
                audit.AuditEvent(
                    at=now - timedelta(days=age_days),
                    event="probe",
                    calling_ae=None,
                    called_ae=None,
                    peer_host=None,
                    study_instance_uid=None,
                    sop_instance_uid=None,
                    detail={"age": age_days},
                )
            )
        assert running.server.housekeeping.purge_audit() == 2
        assert sorted(r.detail["age"] for r in running.audit_rows("probe")) == [0, 29]
    finally:
        running.server.shutdown()
        running.thread.join(timeout=10)
        running.store.close()


def test_stall_inside_a_pdu_after_association_is_cut_at_the_network_timeout(guarded: GuardedScp) -> None:
    timeout = guarded.settings.node.network_timeout_s
    with connect_from("127.0.0.1", guarded.port) as sock:
        sock.sendall(associate_rq("MODALITY"))
        reply = read_pdu(sock)
        assert reply is not None and reply[0] == A_ASSOCIATE_AC
        sock.sendall(pdu_header(0x04, 1000) + bytes(100))  # a tenth of the P-DATA-TF, then silence
        closed_after = wait_closed(sock, timeout + 10)
    assert closed_after is not None and timeout - 0.2 <= closed_after <= timeout + 5
    assert wait_until(lambda: len(guarded.audit_rows(audit.ASSOCIATION_ABORTED)) == 1)
    # Our PDU deadline or pynetdicom's idle timer, whichever fires first; both close the socket.
    assert re.search(r"stalled|network timeout", guarded.audit_rows(audit.ASSOCIATION_ABORTED)[0].detail["reason"])
    assert wait_until(lambda: guarded.server.guard.gate.open_connections == 0)


def test_configured_source_hosts_become_trusted_and_wildcards_do_not(guarded: GuardedScp) -> None:
    guarded.store.add_remote_node(RemoteNode(name="anywhere", ae_title="ANY", host="*", port=104, role="source"))
    guarded.store.add_remote_node(RemoteNode(name="pacs", ae_title="PACS", host="localhost", port=104, role="destination"))
    guarded.server.housekeeping.refresh_trusted()
    gate = guarded.server.guard.gate
    assert gate.is_trusted("127.0.0.1")  # the MODALITY source's host
    assert not gate.is_trusted("127.0.0.9")
    assert "*" not in guarded.server.housekeeping.guard.gate._trusted_ips


def test_a_flood_after_a_hundred_host_spray_is_named_at_once(tmp_path: Path) -> None:
    """Issue 27: idle sockets from 100 hosts use up the window's names; a flood from one more address
    afterwards is still named, at once (at its threshold), not filed under "(other hosts)"."""
    running = start_guarded(tmp_path, audit_window_s=3600)
    spray = [connect_from(f"127.0.1.{index + 1}", running.port) for index in range(100)]
    try:
        deadline = running.settings.limits.establish_timeout_s
        assert all(wait_closed(sock, deadline + 10) is not None for sock in spray)  # shed or timed out
        assert wait_until(lambda: running.server.guard.gate.open_connections == 0)
        flood = 150
        for _ in range(flood):
            with connect_from("127.0.0.7", running.port) as sock:
                sock.sendall(pdu_header(0x04, 10) + bytes(10))  # P-DATA-TF before any association
                reply = read_pdu(sock, timeout=10)
                assert reply is not None and reply[0] == A_ABORT
        assert wait_until(lambda: running.server.guard.gate.open_connections == 0)
        early = [r for r in running.audit_rows(audit.CONNECTIONS_SUMMARY) if r.peer_host == "127.0.0.7"]
        assert [(r.detail["kind"], r.detail["at_threshold"]) for r in early] == [("invalid_pdu", True)]
        assert 90 <= early[0].detail["count"] <= 100
        running.scp.aggregate.flush()
        rows = running.audit_rows(audit.CONNECTIONS_SUMMARY)
        assert sum(r.detail["count"] for r in rows if r.peer_host == "127.0.0.7") == flood
        assert sum(r.detail["count"] for r in rows) == flood + 100
        named = {r.peer_host for r in rows} - {"127.0.0.7", AggregatedAudit.OTHER_HOSTS}
        assert len(named) == running.settings.limits.audit_hosts_per_window - 1  # the flooder took one of the 50
    finally:
        for sock in spray:
            sock.close()
        running.server.shutdown()
        running.thread.join(timeout=10)
        running.store.close()
