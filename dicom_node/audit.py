"""Audit trail: who connected, what was received, what was rejected and why.

Every event is a row in the state store's audit table (:meth:`Store.audit`) and, when
``settings.logging.audit_file`` is set, one JSON line appended to that file (for a SIEM or a
write-once log). Detail holds UIDs, AE titles, counts and reasons; no pixel data and no patient
identifiers.

Per-instance receipt is recorded by the instances table itself (received_at, calling AE, sha256):
the audit table gets one summary per association plus the exceptional per-instance events (a new
version of an instance, a rejected instance), which keeps the ingest path at one transaction per
instance.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable
from typing import Any

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
            at=datetime.now(timezone.utc),
            event=event,
            calling_ae=peer.calling_ae if peer else None,
            called_ae=peer.called_ae if peer else None,
            peer_host=peer.host if peer else None,
            study_instance_uid=study_instance_uid,
            sop_instance_uid=sop_instance_uid,
            detail=detail,
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
                "pid": os.getpid(),
            },
            sort_keys=True,
        )
        assert self.audit_file is not None
        with self._file_lock:
            # O_APPEND writes of one line are atomic enough across our SCP processes.
            with open(self.audit_file, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")


def open_audit_trail(store: Store, audit_file: str) -> AuditTrail:
    return AuditTrail(store=store, audit_file=Path(audit_file) if audit_file else None)
