"""Destination health in the state store (issue 21; table ``destination_health`` of migration 0009).

The deliver workers record, after each association attempt, whether it stored objects and why it
failed; the counts of objects still waiting (pending or retrying) and given up (dead or failed) and
the next try come from the deliveries of each study's current version. The CLI, the console,
/metrics and the operations API read :meth:`list_destination_health`. Portable SQL mixed into
:class:`~dicom_node.store.sql_store.SqlStore` (its ``_transaction``, ``_db_time`` and ``_py_time``).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from dicom_node.store.base import NO_DESTINATION, DestinationHealth, DestinationHealthStore
from dicom_node.store.sql_common import require_aware

#: Reasons are kept to this length (an association failure's text is one line; a C-STORE status short).
REASON_MAX = 500


class DestinationHealthSql(DestinationHealthStore):
    """Portable SQL for :class:`~dicom_node.store.base.DestinationHealthStore`."""

    if TYPE_CHECKING:  # SqlStore's value conversion hooks, which this mixin uses

        def _db_time(self, value: datetime) -> Any: ...
        def _py_time(self, value: Any) -> datetime: ...

    def record_destination_attempt(self, destination: str, at: datetime, *, stored: bool, failure: str | None) -> None:
        if not stored and failure is None:
            return
        when = self._db_time(require_aware("at", at))
        success_at = when if stored else None
        failure_at = when if failure is not None else None
        reason = None if failure is None else failure[:REASON_MAX]
        with self._transaction(write=True) as tx:  # type: ignore[attr-defined]
            tx.execute(
                "INSERT INTO destination_health (destination, last_success_at, last_failure_at, last_failure_reason) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (destination) DO UPDATE SET "
                "last_success_at = COALESCE(excluded.last_success_at, destination_health.last_success_at), "
                "last_failure_at = COALESCE(excluded.last_failure_at, destination_health.last_failure_at), "
                "last_failure_reason = COALESCE(excluded.last_failure_reason, destination_health.last_failure_reason)",
                (destination, success_at, failure_at, reason),
            )

    def list_destination_health(self) -> list[DestinationHealth]:
        with self._transaction(write=False) as tx:  # type: ignore[attr-defined]
            recorded = tx.all("SELECT destination, last_success_at, last_failure_at, last_failure_reason FROM destination_health")
            counts = tx.all(
                "SELECT d.destination, "
                "SUM(CASE WHEN d.status IN ('pending', 'retrying') THEN 1 ELSE 0 END), "
                "SUM(CASE WHEN d.status IN ('dead', 'failed') THEN 1 ELSE 0 END), "
                "MIN(CASE WHEN d.status = 'retrying' THEN d.next_attempt_at END) FROM deliveries d "
                "JOIN studies s ON s.study_instance_uid = d.study_instance_uid AND s.version = d.study_version "
                "GROUP BY d.destination"
            )
        health: dict[str, dict[str, Any]] = {}
        for name, success, failure, reason in recorded:
            health[name] = {
                "last_success_at": None if success is None else self._py_time(success),
                "last_failure_at": None if failure is None else self._py_time(failure),
                "last_failure_reason": reason,
            }
        for name, waiting, given_up, next_at in counts:
            health.setdefault(name, {}).update(
                waiting=int(waiting or 0), given_up=int(given_up or 0), next_attempt_at=None if next_at is None else self._py_time(next_at)
            )
        return [DestinationHealth(name, **fields) for name, fields in sorted(health.items())]

    def count_undelivered_studies(self) -> int:
        with self._transaction(write=False) as tx:  # type: ignore[attr-defined]
            row = tx.one("SELECT COUNT(*) FROM studies WHERE state = 'done' AND error LIKE ?", ["%" + NO_DESTINATION + "%"])
        return int(row[0]) if row else 0
