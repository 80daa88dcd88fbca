"""The store's logic in portable SQL, shared by the SQLite and PostgreSQL backends.

A backend supplies connections and transactions (:meth:`SqlStore._transaction`), converts times
and JSON, and says how to lock a study row. Queries use ``?`` placeholders; the PostgreSQL backend
turns them into ``%s`` (so no query here may contain a literal ``?`` or ``%``).

Concurrency: ``record_instance`` is called at once by several SCP processes for the same study.
The study row is created with ``INSERT ... ON CONFLICT DO NOTHING`` (two creators cannot both win),
then locked (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` already holds the
database's single write lock), and every decision about the instance is taken under that lock.
The unique index on (sop_instance_uid, sha256) backs the duplicate rule up.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from dicom_node.store.api_accounts import ApiAccountSql
from dicom_node.store.base import (
    DELIVERY_STATES,
    INSTANCE_STATES,
    STUDY_STATES,
    AnalysisRecord,
    AuditEvent,
    DeliveryRecord,
    InstanceRecord,
    ProducedObject,
    PurgedStudy,
    RecordOutcome,
    RemoteNode,
    RoutingRuleRecord,
    SourceHostPending,
    Store,
    StoreConflict,
    StoreError,
    StudyRecord,
)
from dicom_node.store.console_queries import ConsoleSql
from dicom_node.store.destination_health import DestinationHealthSql
from dicom_node.store.hosts import is_ip_literal
from dicom_node.store.schema import load_migrations
from dicom_node.store.source_tokens import SourceTokenSql
from dicom_node.store.sql_common import AUDIT_COLUMNS, placeholders, require_aware, utc_now
from dicom_node.store.worker_tokens import WorkerTokenSql
from dicom_node.store.workers import WorkerReportSql

#: A late instance reopens a study in these states as a new analysis version.
REOPEN_STATES = ("queued", "analyzing", "analyzed", "delivering", "done", "failed", "purged")

_NODE_COLUMNS = (
    "name, ae_title, host, port, role, profile, quiet_period_s, complete_on_release, default_destination, "
    "tls, tls_ca_file, tls_cert_file, tls_key_file, tls_verify_peer, tls_check_hostname, tls_client_certificate, "
    "url, auth_token_file, basic_auth_file"
)
_INSTANCE_COLUMNS = (
    "id, sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid, transfer_syntax_uid, "
    "path, size, sha256, calling_ae, received_at, study_version, state, reason"
)
_STUDY_COLUMNS = "study_instance_uid, version, state, source_ae, created_at, updated_at, last_received_at, error, source_node, source_host"
_ANALYSIS_COLUMNS = "study_instance_uid, study_version, sop_instance_uid, status, result_json, error, created_at"
_PRODUCED_COLUMNS = "study_instance_uid, study_version, source_sop_instance_uid, kind, sop_instance_uid, sop_class_uid, path, created_at"
_DELIVERY_COLUMNS = (
    "study_instance_uid, study_version, destination, sop_instance_uid, status, attempts, last_status, error, updated_at, first_attempt_at, next_attempt_at"
)
_IN_CHUNK = 500
_RULE_COLUMNS = "name, position, match_json, action_json, description, enabled, updated_at"


class Tx:
    """A cursor inside one transaction, with ``?`` placeholders translated for the driver."""

    def __init__(self, cursor: Any, placeholder: str) -> None:
        self._cursor = cursor
        self._placeholder = placeholder

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; return the number of rows it changed."""
        if self._placeholder != "?":
            sql = sql.replace("?", self._placeholder)
        self._cursor.execute(sql, tuple(params))
        return self._cursor.rowcount

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        self.execute(sql, params)
        return self._cursor.fetchone()

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        self.execute(sql, params)
        return list(self._cursor.fetchall())


class _NotClaimed(Exception):
    """Internal: roll a claim back, another task holds (or has done) this attempt."""


class _DuplicateFound(Exception):
    """Internal: roll the transaction back, the instance turned out to be a duplicate."""

    def __init__(self, row: tuple) -> None:
        super().__init__("duplicate")
        self.row = row


class SqlStore(ConsoleSql, ApiAccountSql, SourceTokenSql, WorkerReportSql, WorkerTokenSql, DestinationHealthSql, Store):
    """Everything but connections, transactions and value conversions. See the module docstring."""

    #: ``sqlite`` or ``postgres``: picks the migration folder.
    dialect: str = ""
    #: Suffix that locks the selected row until the transaction ends ("" where the whole DB is locked).
    lock_row_sql: str = ""
    #: DDL of the migration bookkeeping table (types differ per dialect).
    schema_version_ddl: str = ""

    # ---- backend hooks ---------------------------------------------------------------------------
    @abc.abstractmethod
    def _transaction(self, write: bool) -> Any:
        """Context manager yielding a :class:`Tx`; commits on success, rolls back on error, and turns
        driver errors into StoreUnavailable / StoreConflict / StoreError."""

    @abc.abstractmethod
    def _migration_transaction(self) -> Any:
        """Like ``_transaction(write=True)`` but holding the cross-process migration lock."""

    @abc.abstractmethod
    def _db_time(self, value: datetime) -> Any: ...

    @abc.abstractmethod
    def _py_time(self, value: Any) -> datetime: ...

    def _py_json(self, value: Any) -> dict[str, Any]:
        return json.loads(value) if isinstance(value, (str, bytes)) else dict(value or {})

    # ---- lifecycle -------------------------------------------------------------------------------
    def migrate(self) -> int:
        migrations = load_migrations(self.dialect)
        known = migrations[-1].version if migrations else 0
        with self._migration_transaction() as tx:
            tx.execute(self.schema_version_ddl)
            applied = {row[0] for row in tx.all("SELECT version FROM schema_version")}
            newest = max(applied, default=0)
            if newest > known:
                raise StoreError(
                    f"the database schema is at version {newest}, newer than this anatomix-node knows ({known}): "
                    "upgrade anatomix-node or point database.url at another database"
                )
            for migration in migrations:
                if migration.version in applied:
                    continue
                for statement in migration.statements:
                    tx.execute(statement)
                tx.execute(
                    "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, self._db_time(utc_now())),
                )
        return known

    def schema_version(self) -> int:
        """The newest migration applied to this database (0 before the first migrate())."""
        with self._transaction(write=False) as tx:
            return int(tx.one("SELECT COALESCE(MAX(version), 0) FROM schema_version")[0])

    def ping(self) -> None:
        with self._transaction(write=False) as tx:
            tx.one("SELECT 1")

    # ---- remote nodes ----------------------------------------------------------------------------
    def _node(self, row: tuple) -> RemoteNode:
        name, ae_title, host, port, role, profile, quiet, on_release, default_dest, tls, ca, cert, key, verify, hostname, client_cert, *web = row
        return RemoteNode(
            name=name, ae_title=ae_title, host=host, port=int(port), role=role, profile=profile,
            quiet_period_s=None if quiet is None else float(quiet), complete_on_release=bool(on_release),
            default_destination=bool(default_dest), tls=bool(tls),
            tls_ca_file=ca, tls_cert_file=cert, tls_key_file=key, tls_verify_peer=bool(verify),
            tls_check_hostname=bool(hostname), tls_client_certificate=client_cert,
            url=web[0], auth_token_file=web[1], basic_auth_file=web[2],
        )  # fmt: skip

    def _node_params(self, node: RemoteNode) -> tuple:
        return (
            node.ae_title, node.host, node.port, node.role, node.profile, node.quiet_period_s,
            bool(node.complete_on_release), bool(node.default_destination), bool(node.tls),
            node.tls_ca_file, node.tls_cert_file, node.tls_key_file, bool(node.tls_verify_peer),
            bool(node.tls_check_hostname), node.tls_client_certificate, node.url, node.auth_token_file, node.basic_auth_file,
        )  # fmt: skip

    def add_remote_node(self, node: RemoteNode) -> None:
        now = self._db_time(utc_now())
        with self._transaction(write=True) as tx:
            if tx.one("SELECT 1 FROM remote_nodes WHERE name = ?", (node.name,)):
                raise StoreConflict(f"a remote node named {node.name!r} already exists")
            tx.execute(
                f"INSERT INTO remote_nodes ({_NODE_COLUMNS}, created_at, updated_at) VALUES ({placeholders(21)})",
                (node.name, *self._node_params(node), now, now),
            )

    def update_remote_node(self, node: RemoteNode) -> None:
        with self._transaction(write=True) as tx:
            changed = tx.execute(
                "UPDATE remote_nodes SET ae_title = ?, host = ?, port = ?, role = ?, profile = ?, quiet_period_s = ?, "
                "complete_on_release = ?, default_destination = ?, tls = ?, tls_ca_file = ?, tls_cert_file = ?, tls_key_file = ?, "
                "tls_verify_peer = ?, tls_check_hostname = ?, tls_client_certificate = ?, url = ?, auth_token_file = ?, basic_auth_file = ?, "
                "updated_at = ? WHERE name = ?",
                (*self._node_params(node), self._db_time(utc_now()), node.name),
            )
        if changed == 0:
            raise KeyError(node.name)

    def get_remote_node(self, name: str) -> RemoteNode | None:
        with self._transaction(write=False) as tx:
            row = tx.one(f"SELECT {_NODE_COLUMNS} FROM remote_nodes WHERE name = ?", (name,))
        return self._node(row) if row else None

    def list_remote_nodes(self) -> list[RemoteNode]:
        with self._transaction(write=False) as tx:
            return [self._node(row) for row in tx.all(f"SELECT {_NODE_COLUMNS} FROM remote_nodes ORDER BY name")]

    def remove_remote_node(self, name: str) -> bool:
        with self._transaction(write=True) as tx:
            return tx.execute("DELETE FROM remote_nodes WHERE name = ?", (name,)) > 0

    def find_source(self, ae_title: str, host: str | None) -> RemoteNode | None:
        """The source with this AE title whose host matches the peer's address.

        Preference: a node naming exactly this host (case-insensitive), then one whose host name
        resolves to this address, then a wildcard node (host ``*`` or empty). ``host=None`` means
        the peer address is not checked: any source with this AE title, wildcard ones first.
        Host names are looked up in :attr:`host_addresses` (resolved off the accept path); a name
        never resolved whose resolution is still running raises :class:`SourceHostPending`.
        """
        with self._transaction(write=False) as tx:
            rows = tx.all(
                f"SELECT {_NODE_COLUMNS} FROM remote_nodes WHERE ae_title = ? AND role IN ('source', 'both') ORDER BY name",
                (ae_title,),
            )
        nodes = [self._node(row) for row in rows]
        wildcard = [n for n in nodes if n.host in ("", "*")]
        if host is None:
            return (wildcard or nodes or [None])[0]
        exact = [n for n in nodes if n.host.lower() == host.lower()]
        if exact:
            return exact[0]
        pending = []
        for node in nodes:
            if node in wildcard or is_ip_literal(node.host):
                continue  # an IP literal that did not match exactly
            addresses = self.host_addresses.lookup(node.host)
            if addresses is None:
                pending.append(node.host)
            elif host in addresses:
                return node
        if pending:  # it may be the one: let the sender retry rather than refuse it for good
            raise SourceHostPending(f"source host {pending[0]!r} is still being resolved")
        return wildcard[0] if wildcard else None

    # ---- instances and studies ------------------------------------------------------------------
    def _instance(self, row: tuple) -> InstanceRecord:
        (id_, sop, sop_class, study, series, ts, path, size, sha, calling_ae, received_at, version, state, reason) = row
        return InstanceRecord(
            sop_instance_uid=sop, sop_class_uid=sop_class, study_instance_uid=study, series_instance_uid=series,
            transfer_syntax_uid=ts, path=path, size=int(size), sha256=sha, calling_ae=calling_ae,
            received_at=self._py_time(received_at), study_version=int(version), state=state, reason=reason, id=int(id_),
        )  # fmt: skip

    def record_instance(self, instance: InstanceRecord, source_node: str | None = None, source_host: str | None = None) -> RecordOutcome:
        received_at = require_aware("received_at", instance.received_at)
        try:
            with self._transaction(write=True) as tx:
                return self._record_instance(tx, instance, received_at, source_node, source_host)
        except _DuplicateFound as found:
            return RecordOutcome("duplicate", self._instance(found.row))

    def _record_instance(self, tx: Tx, instance: InstanceRecord, received_at: datetime, source_node: str | None, source_host: str | None) -> RecordOutcome:
        """Three statements on the common path (the SCP's per-instance commit is on the sender's clock):
        upsert + lock the study, read the rows of this SOP Instance UID, insert the instance."""
        uid = instance.study_instance_uid
        now = self._db_time(utc_now())
        # Creates the study, or locks it (DO UPDATE takes the row lock until commit) and moves
        # last_received_at forward; RETURNING gives the state as it was before this instance.
        version, state, created_at = tx.one(
            "INSERT INTO studies (study_instance_uid, version, state, source_ae, created_at, updated_at, last_received_at, "
            "source_node, source_host) "
            "VALUES (?, 1, 'receiving', ?, ?, ?, ?, ?, ?) ON CONFLICT (study_instance_uid) DO UPDATE SET "
            "updated_at = excluded.updated_at, last_received_at = CASE WHEN excluded.last_received_at > "
            "studies.last_received_at THEN excluded.last_received_at ELSE studies.last_received_at END, "
            # A study first recorded with no known sender (spool reconciliation) takes the first one seen.
            "source_node = CASE WHEN studies.source_host IS NULL THEN excluded.source_node ELSE studies.source_node END, "
            "source_host = CASE WHEN studies.source_host IS NULL THEN excluded.source_host ELSE studies.source_host END "
            "RETURNING version, state, created_at",
            (uid, instance.calling_ae, now, now, self._db_time(received_at), source_node, source_host),
        )
        if created_at == now:  # we inserted it
            self._add_history(tx, uid, 1, "receiving", now)
        # Under the study lock: every earlier content of this SOP instance is visible now.
        earlier = tx.all(f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE sop_instance_uid = ? ORDER BY id", (instance.sop_instance_uid,))
        for row in earlier:
            if row[8] == instance.sha256:  # same bytes: roll the study touch back, write nothing
                raise _DuplicateFound(row)
        reopened = state in REOPEN_STATES
        if reopened:
            version += 1
        if reopened:  # a new analysis version: its results go to whoever sent this instance
            tx.execute(
                "UPDATE studies SET version = ?, state = 'receiving', error = NULL, source_ae = ?, source_node = ?, "
                "source_host = ? WHERE study_instance_uid = ?",
                (version, instance.calling_ae, source_node, source_host, uid),
            )
            self._add_history(tx, uid, version, "receiving", now)
        elif state == "stable":
            tx.execute("UPDATE studies SET state = 'receiving', error = NULL WHERE study_instance_uid = ?", (uid,))
            self._add_history(tx, uid, version, "receiving", now)
        row = tx.one(
            f"INSERT INTO instances ({_INSTANCE_COLUMNS.removeprefix('id, ')}) VALUES ({placeholders(13)}) "
            f"ON CONFLICT (sop_instance_uid, sha256) DO NOTHING RETURNING {_INSTANCE_COLUMNS}",
            (
                instance.sop_instance_uid, instance.sop_class_uid, uid, instance.series_instance_uid,
                instance.transfer_syntax_uid, instance.path, instance.size, instance.sha256, instance.calling_ae,
                self._db_time(received_at), version, "received", None,
            ),
        )  # fmt: skip
        if row is None:  # same bytes recorded meanwhile under another study UID (a broken sender)
            raise _DuplicateFound(
                tx.one(f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE sop_instance_uid = ? AND sha256 = ?",
                       (instance.sop_instance_uid, instance.sha256))
            )  # fmt: skip
        return RecordOutcome("new_version" if earlier else "new", self._instance(row), reopened_study=reopened)

    def _add_history(self, tx: Tx, uid: str, version: int, state: str, at: Any) -> None:
        """Record entering ``state``; ``at`` is a datetime or an already converted database time."""
        tx.execute(
            "INSERT INTO study_state_history (study_instance_uid, version, state, entered_at) VALUES (?, ?, ?, ?)",
            (uid, version, state, self._db_time(at) if isinstance(at, datetime) else at),
        )

    def list_instances(self, study_instance_uid: str, version: int | None = None) -> list[InstanceRecord]:
        sql = f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE study_instance_uid = ?"
        params: list[Any] = [study_instance_uid]
        if version is not None:
            sql += " AND study_version = ?"
            params.append(version)
        with self._transaction(write=False) as tx:
            return [self._instance(row) for row in tx.all(sql + " ORDER BY received_at, id", params)]

    def get_instance(self, instance_id: int) -> InstanceRecord | None:
        with self._transaction(write=False) as tx:
            row = tx.one(f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE id = ?", (instance_id,))
        return self._instance(row) if row else None

    def set_instance_state(self, instance_id: int, state: str, reason: str | None = None) -> None:
        if state not in INSTANCE_STATES:
            raise ValueError(f"instance state {state!r}; known: {', '.join(INSTANCE_STATES)}")
        with self._transaction(write=True) as tx:
            changed = tx.execute("UPDATE instances SET state = ?, reason = ? WHERE id = ?", (state, reason, instance_id))
        if changed == 0:
            raise KeyError(instance_id)

    def get_study(self, study_instance_uid: str) -> StudyRecord | None:
        with self._transaction(write=False) as tx:
            studies = self._select_studies(tx, "WHERE s.study_instance_uid = ?", [study_instance_uid])
        return studies[0] if studies else None

    def list_studies(self, states: tuple[str, ...] | None = None, limit: int = 1000) -> list[StudyRecord]:
        where, params = "", []
        if states:
            where, params = f"WHERE s.state IN ({placeholders(len(states))})", list(states)
        with self._transaction(write=False) as tx:
            return self._select_studies(tx, where, params, f" ORDER BY s.created_at DESC, s.study_instance_uid LIMIT {int(limit)}")

    def _select_studies(self, tx: Tx, where: str, params: list[Any], tail: str = "") -> list[StudyRecord]:
        rows = tx.all(
            f"SELECT {', '.join('s.' + c for c in _STUDY_COLUMNS.split(', '))}, "
            f"(SELECT COUNT(*) FROM instances i WHERE i.study_instance_uid = s.study_instance_uid) "
            f"FROM studies s {where}{tail}",
            params,
        )
        times: dict[tuple[str, int], dict[str, datetime]] = {}
        history: dict[tuple[str, int], list[tuple[str, datetime]]] = {}
        uids = [row[0] for row in rows]
        for start in range(0, len(uids), _IN_CHUNK):  # SQLite caps the number of bound parameters
            chunk = uids[start : start + _IN_CHUNK]
            entries = tx.all(
                "SELECT study_instance_uid, version, state, entered_at FROM study_state_history "
                f"WHERE study_instance_uid IN ({placeholders(len(chunk))}) ORDER BY id",
                chunk,
            )
            for uid, version, state, entered_at in entries:
                at = self._py_time(entered_at)
                times.setdefault((uid, int(version)), {})[state] = at  # latest entry wins
                history.setdefault((uid, int(version)), []).append((state, at))
        return [
            StudyRecord(
                study_instance_uid=uid,
                version=int(version),
                state=state,
                source_ae=source_ae,
                created_at=self._py_time(created),
                updated_at=self._py_time(updated),
                last_received_at=self._py_time(last),
                instance_count=int(count),
                error=error,
                state_times=times.get((uid, int(version)), {}),
                source_node=source_node,
                source_host=source_host,
                history=tuple(history.get((uid, int(version)), ())),
            )  # fmt: skip
            for uid, version, state, source_ae, created, updated, last, error, source_node, source_host, count in rows
        ]

    def transition_study(self, study_instance_uid: str, version: int, from_states: tuple[str, ...], to_state: str, error: str | None = None) -> bool:
        if to_state not in STUDY_STATES:
            raise ValueError(f"study state {to_state!r}; known: {', '.join(STUDY_STATES)}")
        if not from_states:
            return False
        now = utc_now()
        with self._transaction(write=True) as tx:
            changed = tx.execute(
                "UPDATE studies SET state = ?, error = ?, updated_at = ? "
                f"WHERE study_instance_uid = ? AND version = ? AND state IN ({placeholders(len(from_states))})",
                (to_state, error, self._db_time(now), study_instance_uid, version, *from_states),
            )
            if changed:
                self._add_history(tx, study_instance_uid, version, to_state, now)
        return changed > 0

    def requeue_for_analysis(self, study_instance_uid: str, version: int, from_states: tuple[str, ...], new_version: bool) -> int | None:
        uid = study_instance_uid
        with self._transaction(write=True) as tx:
            row = tx.one(f"SELECT version, state FROM studies WHERE study_instance_uid = ?{self.lock_row_sql}", (uid,))
            if row is None or int(row[0]) != version or row[1] not in from_states:
                return None
            if new_version:
                target = version + 1
                tx.execute(
                    "UPDATE instances SET study_version = ?, state = CASE WHEN state IN ('analyzed', 'failed') "
                    "THEN 'selected' ELSE state END WHERE study_instance_uid = ?",
                    (target, uid),
                )
            else:
                target = version
                tx.execute(
                    "UPDATE instances SET state = 'selected', reason = NULL WHERE study_instance_uid = ? AND study_version = ? AND state = 'failed'",
                    (uid, version),
                )
                tx.execute("DELETE FROM analyses WHERE study_instance_uid = ? AND study_version = ? AND status = 'failed'", (uid, version))
            now = utc_now()
            tx.execute(
                "UPDATE studies SET version = ?, state = 'queued', error = NULL, updated_at = ? WHERE study_instance_uid = ?",
                (target, self._db_time(now), uid),
            )
            self._add_history(tx, uid, target, "queued", now)
        return target

    def list_purge_candidates(self, states: tuple[str, ...], updated_before: datetime, limit: int = 500) -> list[str]:
        if not states:
            return []
        with self._transaction(write=False) as tx:
            rows = tx.all(
                f"SELECT study_instance_uid FROM studies WHERE state IN ({placeholders(len(states))}) AND updated_at < ? "
                f"{_undelivered_guard(states)}ORDER BY updated_at, study_instance_uid LIMIT {int(limit)}",
                (*states, self._db_time(require_aware("updated_before", updated_before))),
            )
        return [row[0] for row in rows]

    def purge_study(
        self,
        study_instance_uid: str,
        states: tuple[str, ...],
        updated_before: datetime,
        remove_files: Callable[[list[str], list[str]], None],
    ) -> PurgedStudy | None:
        cutoff = require_aware("updated_before", updated_before)
        uid = study_instance_uid
        with self._transaction(write=True) as tx:
            row = tx.one(f"SELECT version, state, updated_at FROM studies WHERE study_instance_uid = ?{self.lock_row_sql}", (uid,))
            if row is None or row[1] not in states or not self._py_time(row[2]) < cutoff:
                return None
            if _undelivered_guard(states) and tx.one("SELECT 1 FROM deliveries WHERE study_instance_uid = ? AND status IN ('failed', 'dead')", (uid,)):
                return None  # a destination still lacks its results: purged only with the failed studies
            version = int(row[0])
            instances = tx.all("SELECT path, size FROM instances WHERE study_instance_uid = ?", (uid,))
            produced = [r[0] for r in tx.all("SELECT path FROM produced_objects WHERE study_instance_uid = ?", (uid,))]
            for table in ("deliveries", "produced_objects", "analyses", "instances"):
                tx.execute(f"DELETE FROM {table} WHERE study_instance_uid = ?", (uid,))
            now = utc_now()
            tx.execute(
                "UPDATE studies SET state = 'purged', error = NULL, updated_at = ? WHERE study_instance_uid = ?",
                (self._db_time(now), uid),
            )
            self._add_history(tx, uid, version, "purged", now)
            remove_files([r[0] for r in instances], produced)  # still under the study's lock
        return PurgedStudy(uid, version, len(instances), len(produced), sum(int(r[1]) for r in instances))

    # ---- analyses, produced objects, deliveries ---------------------------------------------------
    def save_analysis(self, record: AnalysisRecord) -> None:
        with self._transaction(write=True) as tx:
            tx.execute(
                f"INSERT INTO analyses ({_ANALYSIS_COLUMNS}) VALUES ({placeholders(7)}) "
                "ON CONFLICT (study_instance_uid, study_version, sop_instance_uid) DO UPDATE SET "
                "status = excluded.status, result_json = excluded.result_json, error = excluded.error, "
                "created_at = excluded.created_at",
                (
                    record.study_instance_uid, record.study_version, record.sop_instance_uid, record.status,
                    record.result_json, record.error, self._db_time(require_aware("created_at", record.created_at)),
                ),
            )  # fmt: skip

    def list_analyses(self, study_instance_uid: str, version: int) -> list[AnalysisRecord]:
        with self._transaction(write=False) as tx:
            rows = tx.all(
                f"SELECT {_ANALYSIS_COLUMNS} FROM analyses WHERE study_instance_uid = ? AND study_version = ? ORDER BY sop_instance_uid",
                (study_instance_uid, version),
            )
        return [
            AnalysisRecord(uid, int(v), sop, status, result_json, error, self._py_time(created)) for uid, v, sop, status, result_json, error, created in rows
        ]

    def record_produced_object(self, obj: ProducedObject) -> None:
        with self._transaction(write=True) as tx:
            tx.execute(
                f"INSERT INTO produced_objects ({_PRODUCED_COLUMNS}) VALUES ({placeholders(8)}) "
                "ON CONFLICT (sop_instance_uid) DO NOTHING",
                (
                    obj.study_instance_uid, obj.study_version, obj.source_sop_instance_uid, obj.kind,
                    obj.sop_instance_uid, obj.sop_class_uid, obj.path,
                    self._db_time(require_aware("created_at", obj.created_at)),
                ),
            )  # fmt: skip

    def list_produced_objects(self, study_instance_uid: str, version: int | None = None) -> list[ProducedObject]:
        sql = f"SELECT {_PRODUCED_COLUMNS} FROM produced_objects WHERE study_instance_uid = ?"
        params: list[Any] = [study_instance_uid]
        if version is not None:
            sql += " AND study_version = ?"
            params.append(version)
        with self._transaction(write=False) as tx:
            rows = tx.all(sql + " ORDER BY created_at, sop_instance_uid", params)
        return [
            ProducedObject(uid, int(v), source, kind, sop, sop_class, path, self._py_time(created))
            for uid, v, source, kind, sop, sop_class, path, created in rows
        ]

    def upsert_delivery(self, record: DeliveryRecord) -> None:
        if record.status not in DELIVERY_STATES:
            raise ValueError(f"delivery status {record.status!r}; known: {', '.join(DELIVERY_STATES)}")
        with self._transaction(write=True) as tx:
            tx.execute(
                f"INSERT INTO deliveries ({_DELIVERY_COLUMNS}) VALUES ({placeholders(11)}) "
                "ON CONFLICT (study_instance_uid, study_version, destination, sop_instance_uid) DO UPDATE SET "
                "status = excluded.status, attempts = excluded.attempts, last_status = excluded.last_status, "
                "error = excluded.error, updated_at = excluded.updated_at, "
                "first_attempt_at = excluded.first_attempt_at, next_attempt_at = excluded.next_attempt_at",
                (
                    record.study_instance_uid, record.study_version, record.destination, record.sop_instance_uid,
                    record.status, record.attempts, record.last_status, record.error,
                    self._db_time(require_aware("updated_at", record.updated_at)),
                    self._optional_time("first_attempt_at", record.first_attempt_at),
                    self._optional_time("next_attempt_at", record.next_attempt_at),
                ),
            )  # fmt: skip

    def claim_deliveries(
        self,
        study_instance_uid: str,
        version: int,
        destination: str,
        sop_instance_uids: list[str],
        now: datetime,
        hold_until: datetime,
    ) -> bool:
        now_db = self._db_time(require_aware("now", now))
        hold_db = self._db_time(require_aware("hold_until", hold_until))
        key = (study_instance_uid, version, destination)
        try:
            with self._transaction(write=True) as tx:
                rows = tx.all(
                    "SELECT sop_instance_uid, status, next_attempt_at FROM deliveries "
                    f"WHERE study_instance_uid = ? AND study_version = ? AND destination = ?{self.lock_row_sql}",
                    key,
                )
                existing = {sop: (status, next_at) for sop, status, next_at in rows}
                for sop in sop_instance_uids:
                    if sop in existing:
                        status, next_at = existing[sop]
                        if status not in ("pending", "retrying") or (next_at is not None and self._py_time(next_at) > now):
                            raise _NotClaimed
                        tx.execute(
                            "UPDATE deliveries SET next_attempt_at = ? WHERE study_instance_uid = ? AND study_version = ? "
                            "AND destination = ? AND sop_instance_uid = ?",
                            (hold_db, *key, sop),
                        )
                    elif (
                        tx.execute(
                            f"INSERT INTO deliveries ({_DELIVERY_COLUMNS}) VALUES ({placeholders(11)}) "
                            "ON CONFLICT (study_instance_uid, study_version, destination, sop_instance_uid) DO NOTHING",
                            (*key, sop, "pending", 0, None, None, now_db, None, hold_db),
                        )
                        == 0
                    ):
                        raise _NotClaimed  # another task inserted it meanwhile
        except _NotClaimed:
            return False
        return True

    def list_deliveries(self, study_instance_uid: str | None = None, statuses: tuple[str, ...] | None = None) -> list[DeliveryRecord]:
        clauses, params = [], []
        if study_instance_uid is not None:
            clauses.append("study_instance_uid = ?")
            params.append(study_instance_uid)
        if statuses:
            clauses.append(f"status IN ({placeholders(len(statuses))})")
            params.extend(statuses)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._transaction(write=False) as tx:
            rows = tx.all(
                f"SELECT {_DELIVERY_COLUMNS} FROM deliveries{where} ORDER BY updated_at, study_instance_uid, destination, sop_instance_uid",
                params,
            )
        return [
            DeliveryRecord(
                uid,
                int(v),
                dest,
                sop,
                status,
                int(attempts),
                last_status,
                error,
                self._py_time(updated),
                None if first is None else self._py_time(first),
                None if next_at is None else self._py_time(next_at),
            )  # fmt: skip
            for uid, v, dest, sop, status, attempts, last_status, error, updated, first, next_at in rows
        ]

    def _optional_time(self, name: str, value: datetime | None) -> Any:
        return None if value is None else self._db_time(require_aware(name, value))

    # ---- audit ----------------------------------------------------------------------------------
    def audit(self, event: AuditEvent) -> None:
        with self._transaction(write=True) as tx:
            self._insert_audit(tx, event)

    def _insert_audit(self, tx: Tx, event: AuditEvent) -> None:
        row = tx.one(
            f"INSERT INTO audit_events ({AUDIT_COLUMNS.removeprefix('id, ')}) VALUES ({placeholders(9)}) RETURNING id",
            (
                self._db_time(require_aware("at", event.at)), event.event, event.calling_ae, event.called_ae,
                event.peer_host, event.study_instance_uid, event.sop_instance_uid, json.dumps(event.detail), event.user,
            ),
        )  # fmt: skip
        assert row is not None
        # Queued for the ATNA forwarder in the same transaction, whichever process records it.
        tx.execute("INSERT INTO audit_outbox (event_id) SELECT ? WHERE EXISTS (SELECT 1 FROM audit_forwarding)", (int(row[0]),))

    def purge_audit_events(self, before: datetime) -> int:
        with self._transaction(write=True) as tx:
            # Events still waiting for the ATNA repository are kept until forwarded (nothing is lost).
            return tx.execute(
                "DELETE FROM audit_events WHERE at < ? AND id NOT IN (SELECT event_id FROM audit_outbox)",
                (self._db_time(require_aware("before", before)),),
            )

    def list_audit_events(self, event: str | None = None, limit: int = 1000) -> list[AuditEvent]:
        where, params = ("WHERE event = ? ", [event]) if event is not None else ("", [])
        with self._transaction(write=False) as tx:
            rows = tx.all(f"SELECT {AUDIT_COLUMNS} FROM audit_events {where}ORDER BY id DESC LIMIT {int(limit)}", params)
        return [self._audit_row(row) for row in rows]

    def _audit_row(self, row: tuple) -> AuditEvent:
        id_, at, name, calling, called, peer, study, sop, detail, user = row
        return AuditEvent(
            at=self._py_time(at), event=name, calling_ae=calling, called_ae=called, peer_host=peer,
            study_instance_uid=study, sop_instance_uid=sop, detail=self._py_json(detail), id=int(id_), user=user,
        )  # fmt: skip

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
        clauses, params = ["id > ?"], [int(after_id)]
        if since is not None:
            clauses.append("at >= ?")
            params.append(self._db_time(require_aware("since", since)))
        if until is not None:
            clauses.append("at < ?")
            params.append(self._db_time(require_aware("until", until)))
        if events:
            clauses.append(f"event IN ({placeholders(len(events))})")
            params.extend(events)
        if ae is not None:
            clauses.append("(calling_ae = ? OR called_ae = ?)")
            params.extend((ae, ae))
        if user is not None:
            clauses.append("user_name = ?")
            params.append(user)
        if study_instance_uid is not None:
            clauses.append("study_instance_uid = ?")
            params.append(study_instance_uid)
        with self._transaction(write=False) as tx:
            rows = tx.all(f"SELECT {AUDIT_COLUMNS} FROM audit_events WHERE {' AND '.join(clauses)} ORDER BY id LIMIT {int(limit)}", params)
        return [self._audit_row(row) for row in rows]

    def set_audit_forwarding(self, target: str | None) -> None:
        with self._transaction(write=True) as tx:
            if target is None:
                tx.execute("DELETE FROM audit_forwarding")
            elif tx.one("SELECT 1 FROM audit_forwarding WHERE target = ?", (target,)) is None:
                tx.execute("DELETE FROM audit_forwarding")
                tx.execute(
                    "INSERT INTO audit_forwarding (target, enabled_at) VALUES (?, ?)",
                    (target, self._db_time(datetime.now(UTC))),
                )

    def audit_outbox(self, limit: int = 100) -> list[AuditEvent]:
        columns = ", ".join(f"e.{c.strip()}" for c in AUDIT_COLUMNS.split(","))
        with self._transaction(write=False) as tx:
            rows = tx.all(f"SELECT {columns} FROM audit_outbox o JOIN audit_events e ON e.id = o.event_id ORDER BY o.event_id LIMIT {int(limit)}")
        return [self._audit_row(row) for row in rows]

    def audit_outbox_done(self, event_ids: list[int]) -> int:
        if not event_ids:
            return 0
        with self._transaction(write=True) as tx:
            return tx.execute(f"DELETE FROM audit_outbox WHERE event_id IN ({placeholders(len(event_ids))})", event_ids)

    def audit_outbox_failed(self, event_ids: list[int], error: str) -> None:
        if not event_ids:
            return
        with self._transaction(write=True) as tx:
            tx.execute(
                f"UPDATE audit_outbox SET attempts = attempts + 1, last_error = ? WHERE event_id IN ({placeholders(len(event_ids))})",
                (error[:500], *event_ids),
            )

    def audit_outbox_size(self) -> int:
        with self._transaction(write=False) as tx:
            row = tx.one("SELECT COUNT(*) FROM audit_outbox")
        return int(row[0]) if row else 0

    # ---- routing rules ----------------------------------------------------------------------------
    def _rule(self, row: tuple) -> RoutingRuleRecord:
        name, position, match, action, description, enabled, updated_at = row
        return RoutingRuleRecord(
            name=name, position=int(position), match=self._py_json(match), action=self._py_json(action),
            description=description or "", enabled=bool(enabled), updated_at=self._py_time(updated_at),
        )  # fmt: skip

    def _lock_rules(self, tx: Tx) -> list[str]:
        """Rule names in order, the table locked against other writers until commit (positions are
        renumbered in one transaction; SQLite's BEGIN IMMEDIATE already holds the only write lock)."""
        if self.dialect == "postgres":
            tx.execute("LOCK TABLE routing_rules IN SHARE ROW EXCLUSIVE MODE")
        return [row[0] for row in tx.all("SELECT name FROM routing_rules ORDER BY position, name")]

    def _renumber_rules(self, tx: Tx, order: list[str], before: list[str]) -> None:
        old = {name: index for index, name in enumerate(before)}
        for index, name in enumerate(order):
            if old.get(name) != index:
                tx.execute("UPDATE routing_rules SET position = ? WHERE name = ?", (index + 1, name))

    def add_routing_rule(self, rule: RoutingRuleRecord, position: int | None = None) -> RoutingRuleRecord:
        now = self._db_time(utc_now())
        with self._transaction(write=True) as tx:
            before = self._lock_rules(tx)
            if rule.name in before:
                raise StoreConflict(f"a routing rule named {rule.name!r} already exists")
            index = len(before) if position is None else min(max(position, 1), len(before) + 1) - 1
            order = before[:index] + [rule.name] + before[index:]
            tx.execute(
                f"INSERT INTO routing_rules (name, position, match_json, action_json, description, enabled, created_at, updated_at) VALUES ({placeholders(8)})",
                (rule.name, index + 1, json.dumps(rule.match), json.dumps(rule.action), rule.description, bool(rule.enabled), now, now),
            )
            self._renumber_rules(tx, order, before + [rule.name])
            row = tx.one(f"SELECT {_RULE_COLUMNS} FROM routing_rules WHERE name = ?", (rule.name,))
        return self._rule(row)

    def update_routing_rule(self, rule: RoutingRuleRecord) -> None:
        with self._transaction(write=True) as tx:
            changed = tx.execute(
                "UPDATE routing_rules SET match_json = ?, action_json = ?, description = ?, enabled = ?, updated_at = ? WHERE name = ?",
                (json.dumps(rule.match), json.dumps(rule.action), rule.description, bool(rule.enabled),
                 self._db_time(utc_now()), rule.name),
            )  # fmt: skip
        if changed == 0:
            raise KeyError(rule.name)

    def get_routing_rule(self, name: str) -> RoutingRuleRecord | None:
        with self._transaction(write=False) as tx:
            row = tx.one(f"SELECT {_RULE_COLUMNS} FROM routing_rules WHERE name = ?", (name,))
        return self._rule(row) if row else None

    def list_routing_rules(self) -> list[RoutingRuleRecord]:
        with self._transaction(write=False) as tx:
            return [self._rule(row) for row in tx.all(f"SELECT {_RULE_COLUMNS} FROM routing_rules ORDER BY position, name")]

    def remove_routing_rule(self, name: str) -> bool:
        with self._transaction(write=True) as tx:
            before = self._lock_rules(tx)
            if name not in before:
                return False
            tx.execute("DELETE FROM routing_rules WHERE name = ?", (name,))
            self._renumber_rules(tx, [n for n in before if n != name], before)
        return True

    def move_routing_rule(self, name: str, position: int) -> RoutingRuleRecord:
        with self._transaction(write=True) as tx:
            before = self._lock_rules(tx)
            if name not in before:
                raise KeyError(name)
            rest = [n for n in before if n != name]
            index = min(max(position, 1), len(before)) - 1
            self._renumber_rules(tx, rest[:index] + [name] + rest[index:], before)
            row = tx.one(f"SELECT {_RULE_COLUMNS} FROM routing_rules WHERE name = ?", (name,))
        return self._rule(row)


def _undelivered_guard(states: tuple[str, ...]) -> str:
    """SQL keeping a ``done`` study whose results some destination never got (dead letter, refusal)
    from a purge that does not also take ``failed`` studies: those results may still be re-sent."""
    if "failed" in states:
        return ""
    return "AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.study_instance_uid = studies.study_instance_uid AND d.status IN ('failed', 'dead')) "
