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
and written as one row and one log line per host and kind, once per window, and at once for a host
whose cost passes ``limits.audit_host_threshold``; rejected associations are recorded one by one
only up to ``limits.audit_rejections_per_host`` per host and window, the rest as one summary row.
The hosts named are the costliest, not the first to arrive. Text a peer chose (AE titles) is escaped with :func:`printable` before it reaches a row or a
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
    "evicted_before_association": "were shed for a newer connection (a connection limit was reached and they had not sent a whole A-ASSOCIATE-RQ)",
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


#: Cost units (see :class:`AggregatedAudit`): one per event, one per second a connection held a
#: slot before association, one per this many bytes it sent before association.
COST_BYTES = 65536


@dataclass
class _Tally:
    """One host's window: what it cost and what is not yet written."""

    connections: dict[str, int] = field(default_factory=dict)  # kind -> count not yet written
    individual: int = 0  # rejections recorded one by one
    suppressed: int = 0  # rejections not recorded one by one and not yet written in a summary
    calling_aes: list[str] = field(default_factory=list)
    cost: float = 0.0  # this host's own, this window
    rank: float = 0.0  # cost plus what it inherited from the host whose place it took
    throttled: bool = False

    def add_ae(self, calling_ae: str | None) -> None:
        ae = printable(calling_ae, 16)
        if ae is not None and ae not in self.calling_aes and len(self.calling_aes) < 10:
            self.calling_aes.append(ae)

    def absorb(self, other: _Tally) -> None:
        for kind, count in other.connections.items():
            self.connections[kind] = self.connections.get(kind, 0) + count
        self.suppressed += other.suppressed
        for ae in other.calling_aes:
            self.add_ae(ae)
        self.cost += other.cost
        self.rank += other.cost

    def take(self) -> _Tally:
        """What is not yet written (moved out; the cost stays)."""
        out = _Tally(connections=self.connections, suppressed=self.suppressed, calling_aes=self.calling_aes, cost=self.cost)
        self.connections, self.suppressed, self.calling_aes = {}, 0, []
        return out


class AggregatedAudit:
    """Counts what floods would otherwise write row by row; summaries per host, named by cost.

    Thread-safe; one per SCP process. Per window (``window_s``):

    - each host's **cost** is one unit per event (connection refused, closed, timed out, shed,
      association rejected), plus one per second its connections held a slot before association,
      plus one per :data:`COST_BYTES` bytes they sent before it;
    - at most ``4 x hosts_per_window`` hosts are tracked; a new host beyond that takes the place of
      the tracked host with the lowest rank (whose counts go to "(other hosts)") and inherits that
      rank, so a crowd of one-shot hosts cannot push out one that keeps spending (any host that
      spends more than the window's total divided by the table size stays tracked);
    - a host whose cost reaches ``host_threshold`` is **throttled**: its summary rows (and log lines)
      are written at once, it is named for the rest of the window whatever the budget, and its later
      events are summarised at the window's end;
    - at the window's end (:meth:`flush`) the ``hosts_per_window`` costliest hosts and every
      throttled one are named; the rest are counted together under "(other hosts)".

    Rows per window are bounded: rejections recorded one by one, at most ``rejections_per_host`` per
    host and ``hosts_per_window x rejections_per_host`` in all; summaries, at most one row per kind
    (:data:`CONNECTION_KINDS`) plus one rejection summary, for each of at most ``4 x hosts_per_window``
    named hosts twice (at the threshold and at the end) and once for "(other hosts)".
    """

    OTHER_HOSTS = "(other hosts)"
    TRACKED_PER_NAMED = 4

    def __init__(self, trail: AuditTrail, window_s: float, rejections_per_host: int, hosts_per_window: int, host_threshold: float = 100.0) -> None:
        self.trail = trail
        self.window_s = window_s
        self.rejections_per_host = rejections_per_host
        self.hosts_per_window = hosts_per_window
        self.host_threshold = host_threshold
        self.tracked_hosts = self.TRACKED_PER_NAMED * hosts_per_window
        self._lock = threading.Lock()
        self._tallies: dict[str, _Tally] = {}
        self._other = _Tally()
        self._individual = 0

    def _tally(self, host: str) -> tuple[str, _Tally]:
        tally = self._tallies.get(host)
        if tally is not None:
            return host, tally
        if len(self._tallies) >= self.tracked_hosts:
            lowest = min(((t.rank, h) for h, t in self._tallies.items() if not t.throttled), default=None)
            if lowest is None:  # every tracked host is throttled (each spent the threshold this window)
                return self.OTHER_HOSTS, self._other
            self._other.absorb(self._tallies.pop(lowest[1]))
            tally = self._tallies[host] = _Tally(rank=lowest[0])
            return host, tally
        tally = self._tallies[host] = _Tally()
        return host, tally

    def _spend(self, host: str, tally: _Tally, cost: float) -> tuple[str, _Tally] | None:
        """Add ``cost``; the host's unwritten summary when this crosses the threshold (throttled now)."""
        tally.cost += cost
        tally.rank += cost
        if host == self.OTHER_HOSTS or tally.throttled or tally.cost < self.host_threshold:
            return None
        tally.throttled = True
        return host, tally.take()

    def note_connection(self, host: str, kind: str, held_s: float = 0.0, received: int = 0) -> None:
        """One connection that never became an association: ``held_s`` seconds in a slot, ``received`` bytes."""
        if kind not in CONNECTION_KINDS:
            raise ValueError(f"unknown connection event kind {kind!r}")
        with self._lock:
            name, tally = self._tally(host)
            tally.connections[kind] = tally.connections.get(kind, 0) + 1
            due = self._spend(name, tally, 1 + max(held_s, 0.0) + received / COST_BYTES)
        if due is not None:
            self._write([due], throttled=True)

    def allow_rejection(self, host: str, calling_ae: str | None) -> bool:
        """True if this rejection is recorded individually; else it is counted for the window's summary."""
        with self._lock:
            name, tally = self._tally(host)
            allowed = (
                name != self.OTHER_HOSTS and tally.individual < self.rejections_per_host and self._individual < self.hosts_per_window * self.rejections_per_host
            )
            if allowed:
                tally.individual += 1
                self._individual += 1
            else:
                tally.suppressed += 1
                tally.add_ae(calling_ae)
            due = self._spend(name, tally, 1)
        if due is not None:
            self._write([due], throttled=True)
        return allowed

    def flush(self) -> int:
        """Write this window's summaries (one row and one log line each); returns the rows written."""
        with self._lock:
            tallies, other = self._tallies, self._other
            self._tallies, self._other, self._individual = {}, _Tally(), 0
        named: list[tuple[str, _Tally]] = []
        for place, (host, tally) in enumerate(sorted(tallies.items(), key=lambda item: (-item[1].cost, item[0]))):
            if tally.throttled or place < self.hosts_per_window:
                named.append((host, tally))
            else:
                other.absorb(tally)
        named.append((self.OTHER_HOSTS, other))
        return self._write(named, throttled=False)

    def _write(self, summaries: list[tuple[str, _Tally]], throttled: bool) -> int:
        if throttled:
            window = "so far in this window (the host passed the audit threshold; the rest at the window's end)"
        else:
            window = f"in the last {self.window_s:.0f} s" if self.window_s != 60 else "in the last minute"
        rows = 0
        for host, tally in summaries:
            extra: dict[str, Any] = {"at_threshold": True} if throttled else {}
            for kind, count in sorted(tally.connections.items()):
                log.warning("%d connection(s) from %s %s %s", count, host, CONNECTION_KINDS[kind], window)
                self.trail.record(CONNECTIONS_SUMMARY, Peer(None, None, host), kind=kind, count=count, window_s=self.window_s,
                                  host_cost=round(tally.cost, 1), **extra)  # fmt: skip
                rows += 1
            if tally.suppressed:
                log.warning(
                    "%d further association(s) from %s rejected %s (not recorded one by one; calling AE titles %s)",
                    tally.suppressed,
                    host,
                    window,
                    ", ".join(tally.calling_aes),
                )
                self.trail.record(
                    ASSOCIATIONS_REJECTED_SUMMARY,
                    Peer(None, None, host),
                    count=tally.suppressed,
                    calling_aes=tally.calling_aes,
                    window_s=self.window_s,
                    host_cost=round(tally.cost, 1),
                    **extra,
                )
                rows += 1
        return rows


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
    peer = Peer(destination.ae_title or None, None, destination.host)  # a DICOMweb destination may have no AE title
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
