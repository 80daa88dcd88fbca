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

from dicom_node.store.hosts import HostAddresses

Role = Literal["source", "destination", "both"]

#: Study states, in order; ``failed`` can follow any active state.
#: ``purged``: the retention policy removed the study's files and rows; the row stays as a tombstone.
STUDY_STATES = ("receiving", "stable", "queued", "analyzing", "analyzed", "delivering", "done", "failed", "purged")
#: States a study stays in until something new happens (new instances, resend, reanalysis).
FINAL_STUDY_STATES = ("done", "failed", "purged")
#: In a ``done`` study's note: its results went to no destination at all (its outcome is then
#: ``undelivered``; the full note is :data:`dicom_node.pipeline.routing.NO_DESTINATION_NOTE`).
NO_DESTINATION = "results went nowhere: no destination"
#: Per-instance analysis outcome.
INSTANCE_STATES = ("received", "selected", "skipped", "analyzed", "failed")
DELIVERY_STATES = ("pending", "sent", "retrying", "failed", "dead")


class StoreError(RuntimeError):
    """Base class of state-store errors."""


class StoreUnavailable(StoreError):
    """The database cannot be reached or refused the write (transient: retry later)."""


class SourceHostPending(StoreError):
    """A source's host name is still being resolved in the background (transient: retry shortly)."""


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
    #: certificate and key (None: none), verify its certificate and host name (docs/security.md, "DICOM TLS").
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_verify_peer: bool = True
    #: With ``tls_verify_peer``: also check that its certificate names ``host`` (off: the chain alone).
    tls_check_hostname: bool = True
    #: As a source: ``required`` = its associations are refused unless it presented a trusted client
    #: certificate (on the TLS port); ``optional`` = the TLS port's own rule (``tls.require_client_certificate``).
    tls_client_certificate: str = "optional"
    #: A DICOMweb destination (issue 23): the base URL of its DICOMweb service (e.g.
    #: ``https://pacs.example.org/dicom-web``); results go by STOW-RS, echo is a QIDO-RS query, and
    #: ``host``/``port`` repeat the URL's. None: a DIMSE node (C-STORE, C-ECHO).
    url: str | None = None
    #: With ``url``: a file holding the bearer token sent as ``Authorization: Bearer`` (read at each attempt).
    auth_token_file: str | None = None
    #: With ``url``: a file holding one line ``user:password`` for HTTP basic authentication (read at each attempt).
    basic_auth_file: str | None = None

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
    #: Who did it: an account (API) or OS user (CLI), for admin changes, logins and audit exports.
    user: str | None = None


@dataclass(frozen=True)
class RoutingRuleRecord:
    """A routing rule as stored: ``match`` and ``action`` are the JSON-ready mappings that
    :mod:`dicom_node.pipeline.routing` validated before saving (the store checks nothing in them)."""

    name: str
    #: 1-based place in the evaluation order (kept dense: 1..n).
    position: int
    match: dict[str, Any]
    action: dict[str, Any]
    description: str = ""
    enabled: bool = True
    updated_at: datetime | None = None


# ==== Operations API: accounts, tokens, sessions (issue 10; migration 0003) ===================

#: Roles of API accounts, least to most privileged: viewer reads; operator also echoes, resends and
#: reanalyses; admin also changes configuration and accounts.
API_ROLES = ("viewer", "operator", "admin")


@dataclass(frozen=True)
class ApiUser:
    name: str
    role: str
    #: argon2 hash (never the password).
    password_hash: str
    disabled: bool
    created_at: datetime
    password_changed_at: datetime
    #: The password was generated (``user add``, a reset) and must be changed at the next login.
    must_change_password: bool = False


@dataclass(frozen=True)
class ApiToken:
    """An API token for automation; the secret is shown once, only its SHA-256 is kept."""

    id: int
    user_name: str
    label: str
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class SourceToken:
    """A token bound to a source node (STOW-RS, issue 23): it stores only as that node. The secret
    is shown once; only its SHA-256 is kept. Removing the node removes its tokens."""

    id: int
    node_name: str
    label: str
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class ApiSession:
    """A console login: the cookie's SHA-256 and the CSRF token that state-changing requests must echo."""

    id_hash: str
    user_name: str
    csrf_token: str
    created_at: datetime
    expires_at: datetime


#: Values of ``RemoteNode.tls_client_certificate``.
CLIENT_CERTIFICATE_RULES = ("optional", "required")


@dataclass(frozen=True)
class WorkerReport:
    """What one worker process last said about itself and its model (``worker_reports``).

    ``name`` is unique per process (Celery node name and pool process id). ``model_ok`` is True once
    the model loaded (with its identity and load time), False with ``error`` when it could not.
    """

    name: str
    hostname: str
    pid: int
    queues: tuple[str, ...]
    model_ok: bool
    started_at: datetime
    last_seen_at: datetime
    model_name: str | None = None
    model_version: str | None = None
    model_digest: str | None = None
    demo_weights: bool | None = None
    device: str | None = None
    load_seconds: float | None = None
    error: str | None = None


class WorkerReportStore(abc.ABC):
    """Worker reports (mixed into :class:`SqlStore`)."""

    @abc.abstractmethod
    def record_worker_report(self, report: WorkerReport) -> None:
        """Insert or replace the report of ``report.name``."""

    @abc.abstractmethod
    def list_worker_reports(self) -> list[WorkerReport]:
        """Every report, most recently seen first."""

    @abc.abstractmethod
    def remove_worker_reports(self, seen_before: datetime) -> int:
        """Forget workers not seen since ``seen_before``; how many were removed."""

    @abc.abstractmethod
    def remove_worker_report(self, name: str) -> bool:
        """Forget the worker ``name`` (it stopped cleanly); whether it had a report."""


@dataclass(frozen=True)
class WorkerToken:
    """A worker token (an analyze worker on another host); the secret is shown once, only its SHA-256 is kept."""

    id: int
    name: str
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


class WorkerTokenStore(abc.ABC):
    """Worker tokens (mixed into :class:`SqlStore`)."""

    @abc.abstractmethod
    def add_worker_token(self, name: str, token_hash: str, at: datetime) -> WorkerToken:
        """Store a new token; StoreConflict when a live token already has ``name``."""

    @abc.abstractmethod
    def find_worker_token(self, token_hash: str, now: datetime) -> WorkerToken | None:
        """The live token with this hash (its last use set to ``now``), or None."""

    @abc.abstractmethod
    def list_worker_tokens(self) -> list[WorkerToken]:
        """Every token, revoked ones included, by name."""

    @abc.abstractmethod
    def revoke_worker_token(self, name: str, at: datetime) -> bool:
        """Revoke the live token ``name``; whether there was one."""


class ApiAccountStore(abc.ABC):
    """Account methods of the store (mixed into :class:`SqlStore`)."""

    @abc.abstractmethod
    def add_api_user(self, user: ApiUser) -> None:
        """StoreConflict if the name exists."""

    @abc.abstractmethod
    def get_api_user(self, name: str) -> ApiUser | None: ...

    @abc.abstractmethod
    def list_api_users(self) -> list[ApiUser]: ...

    @abc.abstractmethod
    def update_api_user(
        self,
        name: str,
        role: str | None = None,
        disabled: bool | None = None,
        password_hash: str | None = None,
        must_change_password: bool | None = None,
        keep_session: str | None = None,
    ) -> bool:
        """Change the given fields; False if no such user. A new password or disabling ends the
        user's sessions, but the one whose id hash is ``keep_session``."""

    @abc.abstractmethod
    def remove_api_user(self, name: str) -> bool:
        """Remove the user with their tokens and sessions; False if no such user."""

    @abc.abstractmethod
    def add_api_token(self, user_name: str, label: str, token_hash: str, at: datetime) -> ApiToken: ...

    @abc.abstractmethod
    def find_api_token(self, token_hash: str, now: datetime) -> ApiToken | None:
        """The unrevoked token with this hash (its last use set to ``now``), else None."""

    @abc.abstractmethod
    def list_api_tokens(self, user_name: str | None = None) -> list[ApiToken]: ...

    @abc.abstractmethod
    def revoke_api_token(self, token_id: int, at: datetime) -> bool:
        """False if there is no such unrevoked token."""

    @abc.abstractmethod
    def add_api_session(self, session: ApiSession) -> None:
        """Store a new session (expired ones are removed on the way)."""

    @abc.abstractmethod
    def get_api_session(self, id_hash: str, now: datetime) -> ApiSession | None:
        """The session if it exists and has not expired."""

    @abc.abstractmethod
    def remove_api_session(self, id_hash: str) -> None: ...

    # ---- cheap aggregates for /metrics and /api/status -------------------------------------------
    @abc.abstractmethod
    def count_studies_by_state(self) -> dict[str, int]: ...

    @abc.abstractmethod
    def count_current_deliveries(self) -> list[tuple[str, str, int, int]]:
        """(destination, status, objects, attempts) over the deliveries of each study's current version."""


@dataclass(frozen=True)
class DestinationHealth:
    """How one destination fares (``destination_health`` plus its deliveries of current study versions).

    ``last_success_at``/``last_failure_at``: the last association attempt that stored at least one
    object / that failed for at least one (with ``last_failure_reason``). ``waiting``: objects still
    to send (pending or retrying), the earliest due at ``next_attempt_at``; ``given_up``: objects
    dead-lettered or refused for good (``dead`` and ``failed``), which only a resend sends again.
    """

    destination: str
    last_success_at: datetime | None = None
    last_failure_at: datetime | None = None
    last_failure_reason: str | None = None
    waiting: int = 0
    given_up: int = 0
    next_attempt_at: datetime | None = None

    @property
    def failing(self) -> bool:
        """The last attempt failed (no success since the last failure)."""
        return self.last_failure_at is not None and (self.last_success_at is None or self.last_failure_at >= self.last_success_at)

    @property
    def state(self) -> str:
        """One word for tables and gauges: ``down`` (failing with objects waiting), ``failing``, ``ok`` or ``unused``."""
        if self.failing:
            return "down" if self.waiting else "failing"
        return "ok" if self.last_success_at is not None else "unused"


class SourceTokenStore(abc.ABC):
    """Tokens bound to source nodes (mixed into :class:`SqlStore`; table of migration 0011)."""

    @abc.abstractmethod
    def add_source_token(self, node_name: str, label: str, token_hash: str, at: datetime) -> SourceToken:
        """Raises KeyError when no remote node ``node_name`` exists."""

    @abc.abstractmethod
    def find_source_token(self, token_hash: str, now: datetime) -> SourceToken | None:
        """The unrevoked token with this hash (its last use set to ``now``), or None."""

    @abc.abstractmethod
    def list_source_tokens(self, node_name: str | None = None) -> list[SourceToken]: ...

    @abc.abstractmethod
    def revoke_source_token(self, token_id: int, at: datetime) -> bool:
        """Whether a token that was not yet revoked is revoked now."""


class DestinationHealthStore(abc.ABC):
    """Destination health (mixed into :class:`SqlStore`)."""

    @abc.abstractmethod
    def record_destination_attempt(self, destination: str, at: datetime, *, stored: bool, failure: str | None) -> None:
        """After one association attempt: ``stored`` when it stored at least one object, ``failure``
        (the reason) when at least one object was not stored. Both may be set (a partial success)."""

    @abc.abstractmethod
    def list_destination_health(self) -> list[DestinationHealth]:
        """Every destination that was ever tried or has objects of current study versions, by name."""

    @abc.abstractmethod
    def count_undelivered_studies(self) -> int:
        """Studies ``done`` whose results went to no destination (:data:`NO_DESTINATION` in their note)."""


class Store(ApiAccountStore, SourceTokenStore, WorkerReportStore, WorkerTokenStore, DestinationHealthStore, abc.ABC):
    """State store. Implementations: :class:`SqliteStore`, :class:`PostgresStore`."""

    @property
    def host_addresses(self) -> HostAddresses:
        """This process's cache of source host names -> addresses (:mod:`dicom_node.store.hosts`)."""
        cache: HostAddresses | None = self.__dict__.get("_host_addresses")
        if cache is None:
            cache = self.__dict__.setdefault("_host_addresses", HostAddresses())
            assert isinstance(cache, HostAddresses)
        return cache

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
        """The source node with this AE title whose host matches (a node with host '*' or '' matches any).

        Raises:
            SourceHostPending: a candidate's host name has not been resolved yet (transient).
            StoreUnavailable: the database cannot be reached.
        """

    # ---- instances and studies ------------------------------------------------------------------
    @abc.abstractmethod
    def record_instance(self, instance: InstanceRecord, source_node: str | None = None, source_host: str | None = None) -> RecordOutcome:
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
    def transition_study(self, study_instance_uid: str, version: int, from_states: tuple[str, ...], to_state: str, error: str | None = None) -> bool:
        """Compare-and-set the study's state (only if at this version and in one of from_states).

        Records the time of entering ``to_state``. Returns False (and changes nothing) otherwise.
        """

    @abc.abstractmethod
    def requeue_for_analysis(self, study_instance_uid: str, version: int, from_states: tuple[str, ...], new_version: bool) -> int | None:
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
        self,
        study_instance_uid: str,
        version: int,
        destination: str,
        sop_instance_uids: list[str],
        now: datetime,
        hold_until: datetime,
    ) -> bool:
        """Take the next try of these objects to this destination (compare-and-set), so that two deliver
        tasks never make the same attempt: each row must be ``pending``/``retrying`` and due (no next
        try, or one at or before ``now``); it then waits until ``hold_until`` (the sender records the
        outcome before then). Objects without a row get a ``pending`` one. False, and nothing
        changed, when any of them is not due or not owed."""

    @abc.abstractmethod
    def list_deliveries(self, study_instance_uid: str | None = None, statuses: tuple[str, ...] | None = None) -> list[DeliveryRecord]: ...

    # ---- audit ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def audit(self, event: AuditEvent) -> None: ...

    @abc.abstractmethod
    def list_audit_events(self, event: str | None = None, limit: int = 1000) -> list[AuditEvent]:
        """Newest first."""

    @abc.abstractmethod
    def purge_audit_events(self, before: datetime) -> int:
        """Delete audit rows recorded before ``before`` (audit retention); returns how many."""

    @abc.abstractmethod
    def query_audit_events(
        self,
        since: datetime | None = None,
        until: datetime | None = None,
        events: tuple[str, ...] = (),
        ae: str | None = None,
        user: str | None = None,
        study_instance_uid: str | None = None,
        after_id: int = 0,
        limit: int = 10000,
    ) -> list[AuditEvent]:
        """Oldest first, ids above ``after_id`` (for paging); ``ae`` matches calling or called AE."""

    @abc.abstractmethod
    def set_audit_forwarding(self, target: str | None) -> None:
        """Name the forwarding target (every later audit insert queues its id in the outbox), or
        None: no forwarding, nothing more is queued (what is queued stays until forwarded or purged)."""

    @abc.abstractmethod
    def audit_outbox(self, limit: int = 100) -> list[AuditEvent]:
        """Queued events, oldest first."""

    @abc.abstractmethod
    def audit_outbox_done(self, event_ids: list[int]) -> int:
        """Forwarded and confirmed: drop from the outbox; returns how many."""

    @abc.abstractmethod
    def audit_outbox_failed(self, event_ids: list[int], error: str) -> None:
        """A try that did not confirm: count it, keep the rows."""

    @abc.abstractmethod
    def audit_outbox_size(self) -> int: ...

    # ---- routing rules (evaluation order = position, 1 first) ------------------------------------
    @abc.abstractmethod
    def add_routing_rule(self, rule: RoutingRuleRecord, position: int | None = None) -> RoutingRuleRecord:
        """Insert at ``position`` (1-based; later rules move down) or last when None; StoreConflict
        if the name exists. Returns the rule as stored (its final position)."""

    @abc.abstractmethod
    def update_routing_rule(self, rule: RoutingRuleRecord) -> None:
        """Replace match, action, description and enabled of the rule with this name (its position
        stays); KeyError if unknown."""

    @abc.abstractmethod
    def get_routing_rule(self, name: str) -> RoutingRuleRecord | None: ...

    @abc.abstractmethod
    def list_routing_rules(self) -> list[RoutingRuleRecord]:
        """Every rule, in evaluation order."""

    @abc.abstractmethod
    def remove_routing_rule(self, name: str) -> bool:
        """Remove (later rules move up); False if there was no such rule."""

    @abc.abstractmethod
    def move_routing_rule(self, name: str, position: int) -> RoutingRuleRecord:
        """Put the rule at ``position`` (1-based, clamped to 1..n), the others keeping their order;
        KeyError if unknown. Returns the rule as stored."""
