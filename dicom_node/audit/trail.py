"""Audit trail: who connected, what was received, what was rejected and why.

Every event is a row in the state store's audit table (:meth:`Store.audit`) and, when
``settings.logging.audit_file`` is set, one JSON line appended to that file (for a SIEM or a
write-once log). Detail holds UIDs, AE titles, counts and reasons; no pixel data and no patient
identifiers.

Per-instance receipt is recorded by the instances table itself (received_at, calling AE, sha256):
the audit table gets one summary per association plus the exceptional per-instance events (a new
version of an instance, a rejected instance), which keeps the ingest path at one transaction per
instance.

Under attack the trail stays bounded (:class:`AggregatedAudit`): connection-level events (closed
before association, timed out, refused for a connection limit, oversize PDU) are counted per host
and written once per window as one row and one log line; rejected associations are recorded one by
one only up to ``limits.audit_rejections_per_host`` per host and window, the rest as one summary
row. Text a peer chose (AE titles) is escaped with :func:`printable` before it reaches a row or a
log line.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicom_node.logging_setup import escape_controls
from dicom_node.store.base import AuditEvent, Store, StoreError

log = logging.getLogger(__name__)

ASSOCIATION_ACCEPTED = "association_accepted"
ASSOCIATION_REJECTED = "association_rejected"
ASSOCIATION_RELEASED = "association_released"
ASSOCIATION_ABORTED = "association_aborted"
INSTANCE_NEW_VERSION = "instance_new_version"
INSTANCE_REJECTED = "instance_rejected"
INSTANCE_FLAGGED = "instance_flagged"
INSTANCE_RECOVERED = "instance_recovered"
STUDY_STABLE = "study_stable"
STUDY_PURGED = "study_purged"
#: One row per (host, kind) and window: connection-level events that never became an association.
CONNECTIONS_SUMMARY = "connections_summary"
#: One row per host and window: rejected associations beyond the per-host individual quota.
ASSOCIATIONS_REJECTED_SUMMARY = "association_rejected_summary"
#: The node started / stopped serving (ATNA Application Activity).
APPLICATION_STARTED = "application_started"
APPLICATION_STOPPED = "application_stopped"
#: A study version's analysis ended (detail: version, outcome, summary).
STUDY_ANALYSED = "study_analysed"
#: One delivery attempt to one destination began / ended (detail: destination, sent and failed SOP UIDs).
TRANSFER_STARTED = "objects_send_started"
OBJECTS_SENT = "objects_sent"
#: Configuration changed by an admin: remote nodes, settings, accounts (detail: what, target, before, after).
ADMIN_CHANGE = "admin_change"
#: Logins (API accounts, console sessions) and logouts.
LOGIN = "login"
LOGIN_FAILED = "login_failed"
LOGOUT = "logout"
#: The audit trail itself was queried or exported (ATNA Audit Log Used).
AUDIT_EXPORTED = "audit_exported"

#: Connection-level event kinds (``AggregatedAudit.note_connection``) and their log wording.
CONNECTION_KINDS = {
    "closed_before_association": "closed before association",
    "closed_mid_pdu": "closed in the middle of their first PDU",
    "timed_out_before_association": "did not complete an A-ASSOCIATE-RQ within the deadline and were closed",
    "refused_per_host_limit": "refused at accept (per-host connection limit)",
    "refused_total_limit": "refused at accept (connection limit)",
    "refused_reserved": "refused at accept (remaining slots reserved for configured sources)",
    "oversize_pdu": "sent a first PDU over the size cap and were aborted",
    "invalid_pdu": "sent something other than a valid A-ASSOCIATE-RQ and were aborted",
    "tls_handshake_timed_out": "did not complete the TLS handshake within the deadline and were closed",
    "tls_handshake_failed": "failed the TLS handshake (no or an untrusted client certificate, no common protocol or cipher)",
}


def printable(text: str | None, limit: int = 64) -> str | None:
    """Peer-chosen text made safe for logs and rows: control characters escaped, length bounded."""
    if text is None:
        return None
    return escape_controls(text[:limit])


#: Called with every event recorded in this process (e.g. the Prometheus counters of
#: ``dicom_node.api.metrics``, registered by ``serve`` before the SCP processes fork). A listener
#: must be cheap and never raise into ingest.
LISTENERS: list[Callable[[AuditEvent], None]] = []


@dataclass(frozen=True)
class Peer:
    """The two ends of an association as the audit sees them."""

    calling_ae: str | None
    called_ae: str | None
    host: str | None


@dataclass
class AuditTrail:
    """Writes audit events to the store and optionally to a JSON-lines file."""

    store: Store
    audit_file: Path | None = None
    _file_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(
        self,
        event: str,
        peer: Peer | None = None,
        study_instance_uid: str | None = None,
        sop_instance_uid: str | None = None,
        **detail: Any,
    ) -> None:
        """Write one event. A store failure is logged (the audit must not break ingest), the file still gets it."""
        row = AuditEvent(
            at=datetime.now(UTC),
            event=event,
            calling_ae=peer.calling_ae if peer else None,
            called_ae=peer.called_ae if peer else None,
            peer_host=peer.host if peer else None,
            study_instance_uid=study_instance_uid,
            sop_instance_uid=sop_instance_uid,
            detail=detail,
            user=str(detail["user"])[:128] if detail.get("user") is not None else None,
        )
        try:
            self.store.audit(row)
        except StoreError as exc:
            log.error("audit event %s not written to the state store: %s", event, exc)
        if self.audit_file is not None:
            self.append_line(row)
        for listener in LISTENERS:
            try:
                listener(row)
            except Exception:  # counting must never break the audit or ingest
                log.exception("audit listener failed on %s", event)

    def append_line(self, row: AuditEvent) -> None:
        line = json.dumps(
            {
                "at": row.at.isoformat(),
                "event": row.event,
                "calling_ae": row.calling_ae,
                "called_ae": row.called_ae,
                "peer_host": row.peer_host,
                "study_instance_uid": row.study_instance_uid,
                "sop_instance_uid": row.sop_instance_uid,
                "detail": row.detail,
                "user": row.user,
                "pid": os.getpid(),
            },
            sort_keys=True,
        )
        assert self.audit_file is not None
        with self._file_lock:
            # O_APPEND writes of one line are atomic enough across our SCP processes.
            with open(self.audit_file, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")


class AggregatedAudit:
    """Counts what floods would otherwise write row by row; :meth:`flush` writes one summary per window.

    Thread-safe; one per SCP process. Rows per window are bounded by
    ``hosts_per_window x (len(CONNECTION_KINDS) + rejections_per_host + 1)`` plus one row for all
    other hosts together.
    """

    OTHER_HOSTS = "(other hosts)"

    def __init__(self, trail: AuditTrail, window_s: float, rejections_per_host: int, hosts_per_window: int) -> None:
        self.trail = trail
        self.window_s = window_s
        self.rejections_per_host = rejections_per_host
        self.hosts_per_window = hosts_per_window
        self._lock = threading.Lock()
        self._connections: dict[tuple[str, str], int] = {}
        self._rejected: dict[str, int] = {}  # host -> rejections seen this window
        self._suppressed: dict[str, dict[str, Any]] = {}  # host -> {count, calling_aes}
        self._hosts: set[str] = set()

    def _bucket(self, host: str) -> str:
        """The host itself, or OTHER_HOSTS once a window has named ``hosts_per_window`` hosts."""
        if host in self._hosts:
            return host
        if len(self._hosts) < self.hosts_per_window:
            self._hosts.add(host)
            return host
        return self.OTHER_HOSTS

    def note_connection(self, host: str, kind: str) -> None:
        if kind not in CONNECTION_KINDS:
            raise ValueError(f"unknown connection event kind {kind!r}")
        with self._lock:
            key = (self._bucket(host), kind)
            self._connections[key] = self._connections.get(key, 0) + 1

    def allow_rejection(self, host: str, calling_ae: str | None) -> bool:
        """True if this rejection is recorded individually; else it is counted for the window's summary."""
        with self._lock:
            bucket = self._bucket(host)
            seen = self._rejected.get(bucket, 0)
            self._rejected[bucket] = seen + 1
            if seen < self.rejections_per_host and bucket != self.OTHER_HOSTS:
                return True
            summary = self._suppressed.setdefault(bucket, {"count": 0, "calling_aes": []})
            summary["count"] += 1
            ae = printable(calling_ae, 16)
            if ae is not None and ae not in summary["calling_aes"] and len(summary["calling_aes"]) < 10:
                summary["calling_aes"].append(ae)
            return False

    def flush(self) -> int:
        """Write this window's summaries (one row and one log line each); returns the rows written."""
        with self._lock:
            connections, self._connections = self._connections, {}
            suppressed, self._suppressed = self._suppressed, {}
            self._rejected = {}
            self._hosts = set()
        window = f"the last {self.window_s:.0f} s" if self.window_s != 60 else "the last minute"
        for (host, kind), count in sorted(connections.items()):
            log.warning("%d connection(s) from %s %s in %s", count, host, CONNECTION_KINDS[kind], window)
            self.trail.record(CONNECTIONS_SUMMARY, Peer(None, None, host), kind=kind, count=count, window_s=self.window_s)
        for host, summary in sorted(suppressed.items()):
            log.warning(
                "%d further association(s) from %s rejected in %s (not recorded one by one; calling AE titles %s)",
                summary["count"],
                host,
                window,
                ", ".join(summary["calling_aes"]),
            )
            self.trail.record(
                ASSOCIATIONS_REJECTED_SUMMARY,
                Peer(None, None, host),
                count=summary["count"],
                calling_aes=summary["calling_aes"],
                window_s=self.window_s,
            )
        return len(connections) + len(suppressed)


def open_audit_trail(store: Store, audit_file: str) -> AuditTrail:
    return AuditTrail(store=store, audit_file=Path(audit_file) if audit_file else None)


# ---- helpers for the call sites outside the SCP (workers, CLI, the HTTP API) ------------------------
#
# Each takes the store and settings (anything with ``.logging.audit_file``), so a call site is one line.


def trail_for(store: Store, settings: Any) -> AuditTrail:
    return open_audit_trail(store, settings.logging.audit_file)


def record_authentication(
    store: Store,
    settings: Any,
    user: str,
    success: bool,
    host: str | None = None,
    method: str = "password",
    reason: str | None = None,
    logout: bool = False,
) -> None:
    """A login (``success``), a failed login (with ``reason``: unknown user, bad password, rate
    limited, revoked token) or a logout, by an account of the HTTP API or console."""
    event = LOGOUT if logout else (LOGIN if success else LOGIN_FAILED)
    extra = {"reason": reason} if reason else {}
    trail_for(store, settings).record(event, Peer(None, None, host), user=printable(user, 128), method=method, success=bool(success), **extra)


def record_admin_change(
    store: Store,
    settings: Any,
    user: str,
    what: str,
    target: str,
    before: Any,
    after: Any,
    host: str | None = None,
    via: str = "cli",
) -> None:
    """A configuration change: ``what`` (e.g. ``remote_node.add``, ``settings``, ``account.role``) on
    ``target``, with the state ``before`` and ``after`` (None for a creation / removal). No secrets:
    the caller passes what may be shown (password hashes and tokens never)."""
    trail_for(store, settings).record(
        ADMIN_CHANGE,
        Peer(None, None, host or socket.gethostname()),
        user=user,
        what=what,
        target=target,
        before=_jsonable(before),
        after=_jsonable(after),
        via=via,
    )


#: At most this many lines of a settings file's diff go into its audit row.
DIFF_MAX_LINES = 120


def text_digest(text: str | None) -> dict[str, Any] | None:
    """A file's identity for the audit (sha256, size, lines), instead of the file itself."""
    if text is None:
        return None
    data = text.encode("utf-8")
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "lines": text.count("\n") + (not text.endswith("\n") and bool(text))}


def text_diff(before: str | None, after: str | None, name: str = "file") -> str | None:
    """A unified diff (bounded to :data:`DIFF_MAX_LINES`) of a text file that was replaced; None
    when it was created or removed (the digest says what it is) or nothing changed."""
    if before is None or after is None or before == after:
        return None
    a, b = before.splitlines(), after.splitlines()
    lines = [f"--- {name} (before)", f"+++ {name} (after)"]
    # No autojunk: a settings file repeats lines (comments, blank lines) that must still align.
    for group in difflib.SequenceMatcher(None, a, b, autojunk=False).get_grouped_opcodes(1):
        lines.append(f"@@ -{group[0][1] + 1},{group[-1][2] - group[0][1]} +{group[0][3] + 1},{group[-1][4] - group[0][3]} @@")
        for tag, i1, i2, j1, j2 in group:
            lines += [" " + line for line in a[i1:i2]] if tag == "equal" else []
            lines += ["-" + line for line in a[i1:i2]] if tag in ("replace", "delete") else []
            lines += ["+" + line for line in b[j1:j2]] if tag in ("replace", "insert") else []
    if len(lines) > DIFF_MAX_LINES:
        lines = [*lines[:DIFF_MAX_LINES], f"... {len(lines) - DIFF_MAX_LINES} more diff lines"]
    return "\n".join(lines)


def record_settings_file(store: Store, settings: Any, user: str, what: str, path: str, before: str | None, after: str | None) -> None:
    """A settings file written (e.g. ``init``): its digest before and after and a diff, never the
    whole file (the caller masks secrets in ``before``; the diff shows only changed lines)."""
    trail_for(store, settings).record(
        ADMIN_CHANGE,
        Peer(None, None, socket.gethostname()),
        user=user,
        what=what,
        target=path,
        before=text_digest(before),
        after=text_digest(after),
        diff=text_diff(before, after, Path(path).name),
        via="cli",
    )


def record_audit_export(store: Store, settings: Any, user: str, filters: dict[str, Any], count: int, host: str | None = None, via: str = "cli") -> None:
    """The trail was queried or exported (itself audited: ATNA Audit Log Used)."""
    trail_for(store, settings).record(
        AUDIT_EXPORTED,
        Peer(None, None, host or socket.gethostname()),
        user=user,
        filters=_jsonable(filters),
        count=count,
        via=via,
    )


def record_study_analysed(store: Store, settings: Any, study_instance_uid: str, version: int, outcome: str, summary: str | None = None) -> None:
    try:
        trail_for(store, settings).record(STUDY_ANALYSED, None, study_instance_uid=study_instance_uid, version=version, outcome=outcome, summary=summary)
    except OSError as exc:  # the audit file; the row is written (or its failure logged) already
        log.error("audit file not written: %s", exc)


def record_objects_sent(
    store: Store,
    settings: Any,
    study_instance_uid: str,
    version: int,
    destination: Any,
    outcomes: list[Any] | None,
    sop_class_uids: dict[str, str] | None = None,
) -> None:
    """One delivery attempt to one destination: ``outcomes`` None when it begins (Begin Transferring),
    else the per-object outcomes (``sop_instance_uid``, ``outcome``, ``status``)."""
    peer = Peer(destination.ae_title, None, destination.host)
    base = {"destination": destination.name, "version": version, "port": destination.port}
    try:
        trail = trail_for(store, settings)
        if outcomes is None:
            trail.record(TRANSFER_STARTED, peer, study_instance_uid=study_instance_uid, sop_classes=sop_class_uids or {}, **base)
            return
        sent = [o.sop_instance_uid for o in outcomes if o.outcome == "sent"]
        failed = {o.sop_instance_uid: o.error or "not sent" for o in outcomes if o.outcome != "sent"}
        trail.record(
            OBJECTS_SENT,
            peer,
            study_instance_uid=study_instance_uid,
            sent=sent,
            failed=failed,
            sop_classes=sop_class_uids or {},
            **base,
        )
    except OSError as exc:
        log.error("audit file not written: %s", exc)


def _jsonable(value: Any) -> Any:
    """Dataclasses, paths and datetimes as JSON-friendly values (for before/after and filters)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)
