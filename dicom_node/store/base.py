"""The state store interface: one API, PostgreSQL (psycopg 3) and SQLite behind it.

Every method that changes state runs in one transaction. Methods raise :class:`StoreUnavailable`
when the database cannot be reached (the SCP turns that into 0xA700) and :class:`StoreConflict`
when a uniqueness rule is broken (e.g. adding a remote node whose name exists).

Times are timezone-aware UTC ``datetime`` objects.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

Role = Literal["source", "destination", "both"]

#: Study states, in order; ``failed`` can follow any active state.
#: ``purged``: the retention policy removed the study's files and rows; the row stays as a tombstone.
STUDY_STATES = ("receiving", "stable", "queued", "analyzing", "analyzed", "delivering", "done", "failed", "purged")
#: Per-instance analysis outcome.
INSTANCE_STATES = ("received", "selected", "skipped", "analyzed", "failed")
DELIVERY_STATES = ("pending", "sent", "retrying", "failed", "dead")


class StoreError(RuntimeError):
    """Base class of state-store errors."""


class StoreUnavailable(StoreError):
    """The database cannot be reached or refused the write (transient: retry later)."""


class StoreConflict(StoreError):
    """A uniqueness rule would be broken (permanent for this request)."""


@dataclass(frozen=True)
class RemoteNode:
    """A DICOM peer: a source that may send to us, a destination we send results to, or both."""

    name: str
    ae_title: str
    host: str
    port: int
    role: Role = "both"
    #: Output profile for results sent to this destination (see settings.OUTPUT profiles).
    profile: str = "full"
    #: Quiet period overriding settings.assembly.quiet_period_s for studies from this source.
    quiet_period_s: float | None = None
    #: The study is complete when this source releases its association.
    complete_on_release: bool = False
    #: Receives results of every study, not only of the studies it sent.
    default_destination: bool = False
    tls: bool = False
    #: DICOM TLS as SCU (with ``tls``): PEM CAs for its certificate (None: the system's), our client
    #: certificate and key (None: none), verify its certificate and host name (README "DICOM TLS").
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_verify_peer: bool = True

    @property
    def is_source(self) -> bool:
        return self.role in ("source", "both")

    @property
    def is_destination(self) -> bool:
        return self.role in ("destination", "both")


@dataclass(frozen=True)
class InstanceRecord:
    """One received instance as stored in the spool (one row per distinct byte content)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    #: Path of the spooled file, relative to the spool directory.
    path: str
    size: int
    sha256: str
    calling_ae: str
    received_at: datetime
    #: Analysis version of the study this instance belongs to (set by the store).
    study_version: int = 1
    state: str = "received"
    #: Why the instance was skipped or failed (human readable), None otherwise.
    reason: str | None = None
    id: int | None = None


@dataclass(frozen=True)
class PurgedStudy:
    """What :meth:`Store.purge_study` removed."""

    study_instance_uid: str
    version: int
    instances: int
    produced_objects: int
    bytes: int


@dataclass(frozen=True)
class RecordOutcome:
    """What :meth:`Store.record_instance` did."""

    #: ``new``: first time this SOP Instance UID; ``duplicate``: same UID and same bytes (nothing
    #: stored); ``new_version``: same UID, different bytes (both kept; the caller audits it, with the peer).
    kind: Literal["new", "duplicate", "new_version"]
    instance: InstanceRecord
    #: True when the study had been analysed (or was being analysed) and this instance reopened it.
    reopened_study: bool = False


@dataclass(frozen=True)
class StudyRecord:
    study_instance_uid: str
    #: Analysis version: 1, then +1 each time late instances reopen an analysed study.
    version: int
    state: str
    source_ae: str
    created_at: datetime
    updated_at: datetime
    last_received_at: datetime
    #: Instance rows of the study, all analysis versions (exact duplicates are not rows).
    instance_count: int = 0
    error: str | None = None
    #: Time of entering each state, for this version: {"receiving": t, "stable": t, ...} (the latest
    #: entry of a state re-entered, e.g. by a resend; ``history`` keeps every entry).
    state_times: dict[str, datetime] = field(default_factory=dict)
    #: Name of the configured remote node that sent this version (matched by AE title and host at
    #: acceptance), None for an unknown sender or a study recorded before this was kept.
    source_node: str | None = None
    #: The sender's network address.
    source_host: str | None = None
    #: Every state this version entered, in order (append-only: a resend adds, never rewrites).
    history: tuple[tuple[str, datetime], ...] = ()


@dataclass(frozen=True)
class AnalysisRecord:
    study_instance_uid: str
    study_version: int
    sop_instance_uid: str
    status: Literal["analyzed", "failed"]
    result_json: str | None
    error: str | None
    created_at: datetime


@dataclass(frozen=True)
class ProducedObject:
    """A result instance we built (deterministic UID), stored as a file for (re)delivery."""

    study_instance_uid: str
    study_version: int
    source_sop_instance_uid: str
    kind: str
    sop_instance_uid: str
    sop_class_uid: str
    path: str
    created_at: datetime


@dataclass(frozen=True)
class DeliveryRecord:
    """One result instance to one destination."""

    study_instance_uid: str
    study_version: int
    destination: str
    sop_instance_uid: str
    status: str
    attempts: int
    #: Last DIMSE status (e.g. 0x0000, 0xA700) or None when no response came.
    last_status: int | None
    error: str | None
    updated_at: datetime
    #: First attempt to this destination: the retry window runs from here.
    first_attempt_at: datetime | None = None
    #: When the next try is due (``retrying`` only; None once settled).
    next_attempt_at: datetime | None = None


@dataclass(frozen=True)
class AuditEvent:
    at: datetime
    event: str
    calling_ae: str | None
    called_ae: str | None
    peer_host: str | None
    study_instance_uid: str | None
    sop_instance_uid: str | None
    #: Free-form JSON-serialisable detail. PHI only where the audit purpose needs it.
    detail: dict[str, Any]
    id: int | None = None


class Store(abc.ABC):
    """State store. Implementations: :class:`SqliteStore`, :class:`PostgresStore`."""

    # ---- lifecycle -------------------------------------------------------------------------------
    @abc.abstractmethod
    def migrate(self) -> int:
        """Apply pending versioned migrations; return the schema version now in force."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers."""

    @abc.abstractmethod
    def close(self) -> None: ...

    # ---- remote nodes ----------------------------------------------------------------------------
    @abc.abstractmethod
    def add_remote_node(self, node: RemoteNode) -> None:
        """Add a node; StoreConflict if the name exists."""

    @abc.abstractmethod
    def update_remote_node(self, node: RemoteNode) -> None:
        """Replace the node with this name; KeyError if unknown."""

    @abc.abstractmethod
    def get_remote_node(self, name: str) -> RemoteNode | None: ...

    @abc.abstractmethod
    def list_remote_nodes(self) -> list[RemoteNode]: ...

    @abc.abstractmethod
    def remove_remote_node(self, name: str) -> bool:
        """Remove; False if there was no such node."""

    @abc.abstractmethod
    def find_source(self, ae_title: str, host: str | None) -> RemoteNode | None:
        """The source node with this AE title whose host matches (a node with host '*' or '' matches any)."""

    # ---- instances and studies ------------------------------------------------------------------
    @abc.abstractmethod
    def record_instance(
        self, instance: InstanceRecord, source_node: str | None = None, source_host: str | None = None
    ) -> RecordOutcome:
        """Record a spooled instance and create/touch its study, in one transaction.

        ``source_node``/``source_host``: the configured remote node that sent it and its address; kept
        on the study when it is created or reopened as a new version (results go back there).

        Same SOP Instance UID and same sha256 as a stored row: ``duplicate`` (nothing written).
        Same UID, other bytes: ``new_version`` (a second row). A study in state analyzed or later
        (or analyzing/queued) is reopened: version + 1, state ``receiving``; the instance belongs to
        the new version. A study in ``stable`` goes back to ``receiving`` (same version).
        """

    @abc.abstractmethod
    def list_instances(self, study_instance_uid: str, version: int | None = None) -> list[InstanceRecord]:
        """Instances of a study (of one analysis version, or all), oldest first."""

    @abc.abstractmethod
    def get_instance(self, instance_id: int) -> InstanceRecord | None: ...

    @abc.abstractmethod
    def set_instance_state(self, instance_id: int, state: str, reason: str | None = None) -> None: ...

    @abc.abstractmethod
    def get_study(self, study_instance_uid: str) -> StudyRecord | None: ...

    @abc.abstractmethod
    def list_studies(self, states: tuple[str, ...] | None = None, limit: int = 1000) -> list[StudyRecord]:
        """Studies, newest first, optionally only in the given states."""

    @abc.abstractmethod
    def transition_study(
        self, study_instance_uid: str, version: int, from_states: tuple[str, ...], to_state: str, error: str | None = None
    ) -> bool:
        """Compare-and-set the study's state (only if at this version and in one of from_states).

        Records the time of entering ``to_state``. Returns False (and changes nothing) otherwise.
        """

    @abc.abstractmethod
    def requeue_for_analysis(
        self, study_instance_uid: str, version: int, from_states: tuple[str, ...], new_version: bool
    ) -> int | None:
        """Put a finished study back in ``queued`` for the admin's ``reanalyze``; return the version to analyse.

        Only if the study is at ``version`` and in one of ``from_states`` (else None, nothing changed).
        ``new_version=False``: the same version; its failed instances and failed analyses are cleared
        so they run again (a study that never had results). ``new_version=True``: version + 1 with
        every instance of the study, so the new results get new UIDs and the old ones stay as they were.
        """

    @abc.abstractmethod
    def list_purge_candidates(self, states: tuple[str, ...], updated_before: datetime, limit: int = 500) -> list[str]:
        """Study UIDs in one of ``states`` whose last change is older than ``updated_before``, oldest first."""

    @abc.abstractmethod
    def purge_study(
        self,
        study_instance_uid: str,
        states: tuple[str, ...],
        updated_before: datetime,
        remove_files: Callable[[list[str], list[str]], None],
    ) -> PurgedStudy | None:
        """Delete a study's instances, analyses, produced objects and deliveries; keep a ``purged`` tombstone.

        Only if the study is still in one of ``states`` and unchanged since ``updated_before``
        (checked under the study's lock); otherwise returns None and changes nothing.
        ``remove_files(instance_paths, produced_paths)`` runs inside the transaction, while the
        study is locked: an instance arriving for the study meanwhile waits for the commit and then
        reopens it as a new version, so it can never be recorded against a file being removed.
        """

    # ---- analyses, produced objects, deliveries ---------------------------------------------------
    @abc.abstractmethod
    def save_analysis(self, record: AnalysisRecord) -> None:
        """Insert or replace the analysis of one source instance for one study version."""

    @abc.abstractmethod
    def list_analyses(self, study_instance_uid: str, version: int) -> list[AnalysisRecord]: ...

    @abc.abstractmethod
    def record_produced_object(self, obj: ProducedObject) -> None:
        """Insert, or do nothing if this SOP Instance UID is already recorded (idempotent)."""

    @abc.abstractmethod
    def list_produced_objects(self, study_instance_uid: str, version: int | None = None) -> list[ProducedObject]: ...

    @abc.abstractmethod
    def upsert_delivery(self, record: DeliveryRecord) -> None:
        """Insert or update the row for (study, version, destination, sop_instance_uid)."""

    @abc.abstractmethod
    def claim_deliveries(
        self, study_instance_uid: str, version: int, destination: str, sop_instance_uids: list[str], now: datetime,
        hold_until: datetime,
    ) -> bool:
        """Take the next try of these objects to this destination (compare-and-set), so that two deliver
        tasks never make the same attempt: each row must be ``pending``/``retrying`` and due (no next
        try, or one at or before ``now``); it then waits until ``hold_until`` (the sender records the
        outcome before then). Objects without a row get a ``pending`` one. False, and nothing
        changed, when any of them is not due or not owed."""

    @abc.abstractmethod
    def list_deliveries(
        self, study_instance_uid: str | None = None, statuses: tuple[str, ...] | None = None
    ) -> list[DeliveryRecord]: ...

    # ---- audit ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def audit(self, event: AuditEvent) -> None: ...

    @abc.abstractmethod
    def list_audit_events(self, event: str | None = None, limit: int = 1000) -> list[AuditEvent]:
        """Newest first."""

    @abc.abstractmethod
    def purge_audit_events(self, before: datetime) -> int:
        """Delete audit rows recorded before ``before`` (audit retention); returns how many."""
