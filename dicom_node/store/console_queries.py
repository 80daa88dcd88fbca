"""Read queries of the web console (``dicom_node.console``): keyset pages of studies and the
recent state changes its dashboard charts, mixed into ``SqlStore`` (its ``_transaction``,
``_select_studies``, ``_db_time`` and ``_py_time`` hooks)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from dicom_node.store.base import AuditEvent, StudyRecord
from dicom_node.store.sql_common import AUDIT_COLUMNS


class ConsoleSql:
    def page_studies(
        self,
        states: tuple[str, ...] | None = None,
        source: str | None = None,
        uid_prefix: str | None = None,
        before: tuple[datetime, str] | None = None,
        limit: int = 50,
    ) -> list[StudyRecord]:
        """Studies newest first (created_at, then UID, both descending), at most ``limit``, strictly
        after the keyset ``before`` = (created_at, study_instance_uid) of the previous page's last row.
        ``source`` matches the calling AE title or the remote node's name; ``uid_prefix`` the UID's start."""
        clauses: list[str] = []
        params: list[Any] = []
        if states:
            clauses.append(f"s.state IN ({', '.join('?' * len(states))})")
            params += list(states)
        if source:
            clauses.append("(s.source_ae = ? OR s.source_node = ?)")
            params += [source, source]
        if uid_prefix:
            clauses.append("s.study_instance_uid LIKE ? ESCAPE '!'")
            params.append(uid_prefix.replace("!", "!!").replace("%", "!%").replace("_", "!_") + "%")
        if before is not None:
            at = self._db_time(before[0])  # type: ignore[attr-defined]
            clauses.append("(s.created_at < ? OR (s.created_at = ? AND s.study_instance_uid < ?))")
            params += [at, at, before[1]]
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        with self._transaction(write=False) as tx:  # type: ignore[attr-defined]
            return self._select_studies(tx, where, params, f" ORDER BY s.created_at DESC, s.study_instance_uid DESC LIMIT {int(limit)}")  # type: ignore[attr-defined]

    def instance_state_counts(self, keys: list[tuple[str, int]]) -> dict[tuple[str, int], dict[str, int]]:
        """{(study UID, version): {instance state: count}} for these study versions, in one query."""
        uids = sorted({uid for uid, _ in keys})
        wanted = set(keys)
        counts: dict[tuple[str, int], dict[str, int]] = {key: {} for key in keys}
        if not uids:
            return counts
        with self._transaction(write=False) as tx:  # type: ignore[attr-defined]
            rows = tx.all(f"SELECT study_instance_uid, study_version, state, COUNT(*) FROM instances "
                          f"WHERE study_instance_uid IN ({', '.join('?' * len(uids))}) GROUP BY study_instance_uid, study_version, state", uids)  # fmt: skip
        for uid, version, state, n in rows:
            if (uid, int(version)) in wanted:
                counts[(uid, int(version))][state] = int(n)
        return counts

    def state_entries_since(self, since: datetime) -> list[tuple[str, datetime]]:
        """(state, entered_at) of each state first entered by a study version at or after ``since``,
        oldest first. A state entered again (a resend's second ``done``) is not counted again."""
        at = self._db_time(since)  # type: ignore[attr-defined]
        with self._transaction(write=False) as tx:  # type: ignore[attr-defined]
            rows = tx.all(
                "SELECT h.state, MIN(h.entered_at) AS first_at FROM study_state_history h "
                "JOIN (SELECT DISTINCT study_instance_uid, version FROM study_state_history WHERE entered_at >= ?) r "
                "ON r.study_instance_uid = h.study_instance_uid AND r.version = h.version "
                "GROUP BY h.study_instance_uid, h.version, h.state HAVING MIN(h.entered_at) >= ? ORDER BY first_at",
                [at, at],
            )
        return [(state, self._py_time(at)) for state, at in rows]  # type: ignore[attr-defined]

    def page_audit_events(
        self,
        since: datetime | None = None,
        until: datetime | None = None,
        events: tuple[str, ...] = (),
        ae: str | None = None,
        user: str | None = None,
        study_instance_uid: str | None = None,
        before_id: int | None = None,
        limit: int = 50,
    ) -> list[AuditEvent]:
        """Audit events newest first (by id), at most ``limit``, with ids below ``before_id`` (the
        previous page's last); the filters are ``query_audit_events``'s."""
        clauses: list[str] = []
        params: list[Any] = []
        for column, op, value in (("at", ">=", since), ("at", "<", until)):
            if value is not None:
                clauses.append(f"{column} {op} ?")
                params.append(self._db_time(value))  # type: ignore[attr-defined]
        if events:
            clauses.append(f"event IN ({', '.join('?' * len(events))})")
            params += list(events)
        if ae:
            clauses.append("(calling_ae = ? OR called_ae = ?)")
            params += [ae, ae]
        if user:
            clauses.append("user_name = ?")
            params.append(user)
        if study_instance_uid:
            clauses.append("study_instance_uid = ?")
            params.append(study_instance_uid)
        if before_id is not None:
            clauses.append("id < ?")
            params.append(int(before_id))
        where = ("WHERE " + " AND ".join(clauses) + " ") if clauses else ""
        with self._transaction(write=False) as tx:  # type: ignore[attr-defined]
            rows = tx.all(f"SELECT {AUDIT_COLUMNS} FROM audit_events {where}ORDER BY id DESC LIMIT {int(limit)}", params)
        return [self._audit_row(row) for row in rows]  # type: ignore[attr-defined]
