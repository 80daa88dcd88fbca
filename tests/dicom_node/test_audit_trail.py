"""The audit trail as a queryable store (SQLite and PostgreSQL, real servers), its call-site helpers,
the ``audit`` CLI with its JSON-lines export (itself audited), and the DICOM audit messages
(PS3.15 A.5) built from every kind of row."""

from __future__ import annotations

import hashlib
import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

from dicom_node.audit import trail as audit
from dicom_node.audit.atna import SourceInfo, audit_message
from dicom_node.audit.trail import AuditTrail, Peer
from dicom_node.store import open_store
from dicom_node.store.base import AuditEvent, RemoteNode, Store
from tests.support.atna_schema import audit_message_errors
from tests.support.node import NODE_COMMAND, REPO_ROOT, NodeProcess
from tests.support.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)
from tests.support.stores import store, store_url  # noqa: F401 (fixtures)

SETTINGS = SimpleNamespace(logging=SimpleNamespace(audit_file=""))
SOURCE = SourceInfo(audit_source_id="ANATOMIX", ae_title="ANATOMIX", hostname="node.example", enterprise_site_id="SITE-1")


def _event(at: datetime, name: str, **kw) -> AuditEvent:
    base = dict(calling_ae=None, called_ae=None, peer_host=None, study_instance_uid=None, sop_instance_uid=None, detail={})
    base.update(kw)
    return AuditEvent(at=at, event=name, **base)


def test_query_filters_time_event_ae_user_study(store: Store) -> None:
    now = datetime.now(UTC)
    store.audit(_event(now - timedelta(hours=3), "association_rejected", calling_ae="EVIL", called_ae="ANATOMIX", detail={"reason": "unknown AE"}))
    store.audit(_event(now - timedelta(hours=2), "association_accepted", calling_ae="MODALITY", called_ae="ANATOMIX"))
    store.audit(_event(now - timedelta(hours=1), "study_analysed", study_instance_uid="1.2.3"))
    audit.record_authentication(store, SETTINGS, "alice", False, host="10.0.0.9", reason="bad password")
    audit.record_authentication(store, SETTINGS, "alice", True, host="10.0.0.9")
    audit.record_admin_change(store, SETTINGS, "bob", "remote_node.update", "pacs", {"port": 104}, {"port": 11112})

    names = lambda rows: [r.event for r in rows]  # noqa: E731
    assert names(store.query_audit_events()) == ["association_rejected", "association_accepted", "study_analysed", "login_failed", "login", "admin_change"]
    assert names(store.query_audit_events(since=now - timedelta(minutes=150), until=now - timedelta(minutes=30))) == ["association_accepted", "study_analysed"]
    assert names(store.query_audit_events(events=("login", "login_failed"))) == ["login_failed", "login"]
    assert names(store.query_audit_events(ae="EVIL")) == ["association_rejected"]
    assert names(store.query_audit_events(ae="ANATOMIX")) == ["association_rejected", "association_accepted"]
    assert names(store.query_audit_events(user="alice")) == ["login_failed", "login"]
    assert names(store.query_audit_events(study_instance_uid="1.2.3")) == ["study_analysed"]
    failed = store.query_audit_events(events=("login_failed",))[0]
    assert failed.user == "alice" and failed.peer_host == "10.0.0.9" and failed.detail["reason"] == "bad password"
    change = store.query_audit_events(user="bob")[0]
    assert change.detail["before"] == {"port": 104} and change.detail["after"] == {"port": 11112}
    first_two = store.query_audit_events(limit=2)
    assert names(store.query_audit_events(after_id=first_two[-1].id, limit=1)) == ["study_analysed"]


def test_outbox_queues_only_while_forwarding_and_retention_keeps_unforwarded(store: Store) -> None:
    trail = AuditTrail(store)
    old = datetime.now(UTC) - timedelta(days=90)
    store.audit(_event(old, "before_forwarding"))
    assert store.audit_outbox_size() == 0
    store.set_audit_forwarding("tcp://repo:601")
    store.audit(_event(old, "old_unforwarded"))
    trail.record("association_accepted", Peer("A", "B", "127.0.0.1"))
    queued = store.audit_outbox()
    assert [e.event for e in queued] == ["old_unforwarded", "association_accepted"]
    store.audit_outbox_failed([queued[0].id], "connection refused")
    assert store.audit_outbox_size() == 2  # a failed try keeps them
    # Retention deletes the old forwarded-or-never-queued row, not the one still waiting.
    assert store.purge_audit_events(datetime.now(UTC) - timedelta(days=30)) == 1
    assert [e.event for e in store.audit_outbox()] == ["old_unforwarded", "association_accepted"]
    assert store.audit_outbox_done([e.id for e in queued]) == 2
    assert store.audit_outbox_size() == 0
    store.set_audit_forwarding(None)
    trail.record("association_released", Peer("A", "B", "127.0.0.1"))
    assert store.audit_outbox_size() == 0


def _all_kinds(tmp_path: Path) -> list[AuditEvent]:
    """One row of every kind the node records, through the real helpers and the SCP's trail."""
    store = open_store(f"sqlite:///{tmp_path / 'kinds.db'}")
    trail = AuditTrail(store)
    peer = Peer("MODALITY", "ANATOMIX", "127.0.0.1")
    trail.record(audit.ASSOCIATION_ACCEPTED, peer, source="modality")
    trail.record(audit.ASSOCIATION_REJECTED, Peer("EVIL", "ANATOMIX", "10.1.1.1"), result=1, source=1, diagnostic=3, reason="calling AE not configured")
    trail.record(audit.ASSOCIATION_RELEASED, peer, received=2, studies=["1.2.3"])
    trail.record(audit.ASSOCIATION_RELEASED, Peer("ECHO", "ANATOMIX", "127.0.0.1"), received=0, studies=[])
    trail.record(audit.ASSOCIATION_ABORTED, peer, received=1, studies=["1.2.3"], reason="network timeout")
    trail.record(audit.INSTANCE_REJECTED, peer, sop_instance_uid="1.2.3.4", status=0xA900, reason="not DICOM")
    trail.record(audit.INSTANCE_NEW_VERSION, peer, study_instance_uid="1.2.3", sop_instance_uid="1.2.3.5")
    trail.record(audit.CONNECTIONS_SUMMARY, Peer(None, None, "10.1.1.1"), kind="closed_before_association", count=7, window_s=60)
    trail.record(audit.ASSOCIATIONS_REJECTED_SUMMARY, Peer(None, None, "10.1.1.1"), count=40, calling_aes=["X"], window_s=60)
    trail.record(audit.STUDY_STABLE, None, study_instance_uid="1.2.3")
    trail.record(audit.STUDY_PURGED, None, study_instance_uid="1.2.3", files=3)
    trail.record(audit.APPLICATION_STARTED, None, ae_title="ANATOMIX")
    trail.record(audit.APPLICATION_STOPPED, None, ae_title="ANATOMIX")
    audit.record_study_analysed(store, SETTINGS, "1.2.3", 1, "analyzed", "2 analysed")
    destination = RemoteNode("pacs", "PACS", "127.0.0.1", 11112, role="destination")
    classes = {"9.1": "1.2.840.10008.5.1.4.1.1.88.34", "9.2": "1.2.840.10008.5.1.4.1.1.66.4"}
    audit.record_objects_sent(store, SETTINGS, "1.2.3", 1, destination, None, classes)
    outcomes = [
        SimpleNamespace(sop_instance_uid="9.1", outcome="sent", error=None),
        SimpleNamespace(sop_instance_uid="9.2", outcome="transient", error="association rejected"),
    ]
    audit.record_objects_sent(store, SETTINGS, "1.2.3", 1, destination, outcomes, classes)
    audit.record_admin_change(store, SETTINGS, "bob", "remote_node.add", "pacs", None, destination)
    audit.record_authentication(store, SETTINGS, "alice", True, host="10.0.0.9")
    audit.record_authentication(store, SETTINGS, "mallory", False, host="10.0.0.66", reason="bad password")
    audit.record_authentication(store, SETTINGS, "alice", True, host="10.0.0.9", logout=True)
    audit.record_audit_export(store, SETTINGS, "carol", {"event": ["login_failed"]}, 1)
    trail.record("study_resent", Peer(None, None, "admin-box"), study_instance_uid="1.2.3", user="bob")
    rows = store.query_audit_events()
    store.close()
    return rows


def test_every_kind_of_row_is_a_valid_dicom_audit_message(tmp_path: Path) -> None:
    rows = _all_kinds(tmp_path)
    assert len(rows) == 22
    event_ids = {}
    for row in rows:
        xml, severity = audit_message(row, SOURCE, lambda uid: ("PAT-7", "Doe^Jane") if uid == "1.2.3" else None)
        assert audit_message_errors(xml) == [], (row.event, xml.decode())
        event_ids.setdefault(row.event, (xml, severity))  # the first of each kind
    import xml.etree.ElementTree as ET

    def root(name):
        return ET.fromstring(event_ids[name][0])

    rejected = root("association_rejected")
    assert rejected.find("EventIdentification/EventID").get("csd-code") == "110113"  # Security Alert
    assert rejected.find("EventIdentification").get("EventOutcomeIndicator") == "4"
    assert "calling AE not configured" in rejected.find("EventIdentification/EventOutcomeDescription").text
    assert event_ids["association_rejected"][1] == 4  # warning
    received = root("association_released")
    assert received.find("EventIdentification/EventID").get("csd-code") == "110104"
    assert {p.get("ParticipantObjectID") for p in received.findall("ParticipantObjectIdentification")} == {"1.2.3", "PAT-7"}
    assert root("objects_send_started").find("EventIdentification/EventID").get("csd-code") == "110102"
    sent = root("objects_sent")
    assert sent.find("EventIdentification").get("EventOutcomeIndicator") == "4"  # one of two not sent
    assert [(s.get("UID"), s.get("NumberOfInstances")) for s in sent.iter("SOPClass")] == [("1.2.840.10008.5.1.4.1.1.88.34", "1")]
    assert root("login_failed").find("EventIdentification/EventID").get("csd-code") == "110114"
    assert root("logout").find("EventIdentification/EventTypeCode").get("csd-code") == "110123"
    assert root("audit_exported").find("EventIdentification/EventID").get("csd-code") == "110101"
    assert root("application_started").find("EventIdentification/EventTypeCode").get("csd-code") == "110120"
    assert root("study_purged").find("EventIdentification").get("EventActionCode") == "D"
    change = root("admin_change")
    assert change.find("EventIdentification/EventTypeCode").get("csd-code") == "110128"  # Network Configuration
    import base64

    details = {d.get("type"): json.loads(base64.b64decode(d.get("value"))) for d in change.iter("ParticipantObjectDetail")}
    assert details["before"] is None and details["after"]["ae_title"] == "PACS"


def test_the_schema_checks_catch_broken_messages() -> None:
    row = _event(datetime.now(UTC), "association_rejected", calling_ae="EVIL", peer_host="10.0.0.1")
    xml = audit_message(row, SOURCE)[0]
    assert audit_message_errors(xml) == []
    broken = {
        b'EventOutcomeIndicator="4"': b'EventOutcomeIndicator="3"',
        b' UserIsRequestor="true"': b"",
        b'AuditSourceID="ANATOMIX"': b'AuditSourceID=""',
        b'csd-code="110113"': b'csd-code="999999"',
        b"<AuditSourceIdentification": b"<Bogus />\n<AuditSourceIdentification",
    }
    for old, new in broken.items():
        assert old in xml, old
        assert audit_message_errors(xml.replace(old, new)), new


# ---- the CLI ----------------------------------------------------------------------------------------


def _cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*NODE_COMMAND, *args, "--config", str(node.config_path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_cli_admin_changes_are_audited_and_the_export_is_itself_audited(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node")
    node.write_config()
    node.open_store().close()  # migrated, as init or serve would
    assert _cli(node, "ae", "add", "pacs", "--ae-title", "PACS", "--host", "127.0.0.1", "--port", "11112", "--role", "destination").returncode == 0
    assert _cli(node, "ae", "update", "pacs", "--port", "11113").returncode == 0
    assert _cli(node, "ae", "remove", "pacs").returncode == 0

    export = _cli(node, "audit", "--event", "admin_change", "--jsonl")
    assert export.returncode == 0, export.stderr
    lines = [json.loads(line) for line in export.stdout.splitlines()]
    assert [line["detail"]["what"] for line in lines] == ["remote_node.add", "remote_node.update", "remote_node.remove"]
    add, update, remove = lines
    assert add["detail"]["before"] is None and add["detail"]["after"]["port"] == 11112
    assert update["detail"]["before"]["port"] == 11112 and update["detail"]["after"]["port"] == 11113
    assert remove["detail"]["before"]["port"] == 11113 and remove["detail"]["after"] is None
    user = add["user"]
    assert user and all(line["user"] == user for line in lines)

    # The export was itself recorded, with its filters and count; --user finds both kinds.
    exported = json.loads(_cli(node, "audit", "--event", "audit_exported", "--jsonl").stdout.splitlines()[0])
    assert exported["detail"]["count"] == 3 and exported["detail"]["filters"] == {"events": ["admin_change"]}
    by_user = _cli(node, "audit", "--user", user, "--jsonl").stdout.splitlines()
    assert len(by_user) == 5  # 3 changes + 2 exports so far
    table = _cli(node, "audit", "--since", "1h", "--event", "admin_change,audit_exported")
    assert table.returncode == 0 and "remote_node.update" in table.stdout and "ID" in table.stdout.splitlines()[0]
    assert _cli(node, "audit", "--since", "2999-01-01T00:00:00Z", "--jsonl").stdout == ""
    bad = _cli(node, "audit", "--since", "yesterday-ish")
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr and "Traceback" not in bad.stderr


def test_init_is_an_audited_settings_change_with_passwords_masked(tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*NODE_COMMAND, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)

    site = tmp_path / "site"
    assert cli("init", "--dir", str(site)).returncode == 0
    config = site / "anatomix-node.toml"
    config.write_text(config.read_text() + '\n# old = "postgresql://anx:s3cret@db:5432/anatomix"\n')
    assert cli("init", "--dir", str(site), "--force").returncode == 0
    out = cli("audit", "--event", "admin_change", "--jsonl", "--config", str(config))
    assert out.returncode == 0, out.stderr
    first, second = [json.loads(line)["detail"] for line in out.stdout.splitlines()]
    assert first["what"] == second["what"] == "settings.init" and first["before"] is None and first["diff"] is None
    # A digest and a diff, never the settings file itself (issue 21: an 11 KB row).
    written = config.read_bytes()
    assert second["after"] == {"sha256": hashlib.sha256(written).hexdigest(), "bytes": len(written), "lines": written.count(b"\n")}
    assert second["before"]["bytes"] > second["after"]["bytes"]
    assert '-# old = "postgresql://anx:***@db:5432/anatomix"' in second["diff"].splitlines() and "s3cret" not in out.stdout
    assert "[audit]" not in out.stdout and max(len(line) for line in out.stdout.splitlines()) < 1500


def test_the_operations_apis_events_are_the_same_dicom_audit_messages() -> None:
    """The HTTP API records its own event names (api_login, api_login_failed, api_change): on the
    ATNA wire they are User Authentication and Security Alert messages, as the CLI's are."""
    at = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)

    def row(name: str, **detail) -> AuditEvent:
        return AuditEvent(at=at, event=name, calling_ae=None, called_ae=None, peer_host="10.0.0.9", study_instance_uid=None,
                          sop_instance_uid=None, detail=detail, user=detail.get("user"))  # fmt: skip

    messages = {
        name: audit_message(event, SOURCE)
        for name, event in [
            ("api_login", row("api_login", user="alice", role="admin")),
            ("api_login_failed", row("api_login_failed", user="mallory", reason="bad password")),
            ("api_login_rate_limited", row("api_login_rate_limited", user="mallory")),
            ("api_change", row("api_change", user="alice", via="session", action="node.add", target="pacs", after={"port": 104})),
        ]
    }
    import xml.etree.ElementTree as ET

    for name, (xml, _) in messages.items():
        assert audit_message_errors(xml) == [], (name, xml.decode())
    ident = {name: ET.fromstring(xml).find("EventIdentification") for name, (xml, _) in messages.items()}
    assert ident["api_login"].find("EventID").get("csd-code") == "110114"  # User Authentication
    assert ident["api_login"].get("EventOutcomeIndicator") == "0"
    for failed in ("api_login_failed", "api_login_rate_limited"):
        assert ident[failed].find("EventID").get("csd-code") == "110114" and ident[failed].get("EventOutcomeIndicator") == "4"
        assert messages[failed][1] == 4  # syslog warning
    assert ident["api_change"].find("EventID").get("csd-code") == "110113"  # Security Alert
    assert ident["api_change"].find("EventTypeCode").get("csd-code") == "110128"  # Network Configuration
    assert "mallory" in messages["api_login_failed"][0].decode()
