"""Worker reports in the state store (issue 10; table ``worker_reports`` of migration 0008).

Every analyze worker process writes one row about itself (its model loaded or not, the model's
identity and load time) at warm-up and again periodically; the operations API reads them for
``/readyz``, ``/api/status`` and ``anatomix_model_load_seconds``. Workers may run on other hosts,
so the store, which they all reach, is where this meets. Portable SQL mixed into
:class:`~dicom_node.store.sql_store.SqlStore` (its ``_transaction``, ``_db_time`` and ``_py_time``).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from dicom_node.store.base import WorkerReport, WorkerReportStore
from dicom_node.store.sql_common import placeholders

_COLUMNS = ("name", "hostname", "pid", "queues", "model_ok", "model_name", "model_version", "model_digest", "demo_weights",
            "device", "load_seconds", "error", "started_at", "last_seen_at")  # fmt: skip


class WorkerReportSql(WorkerReportStore):
    """Portable SQL for :class:`~dicom_node.store.base.WorkerReportStore`."""

    if TYPE_CHECKING:  # SqlStore's value conversion hooks, which this mixin uses

        def _db_time(self, value: datetime) -> Any: ...
        def _py_time(self, value: Any) -> datetime: ...

    def record_worker_report(self, report: WorkerReport) -> None:
        values = (
            report.name, report.hostname, report.pid, ",".join(report.queues), bool(report.model_ok), report.model_name,
            report.model_version, report.model_digest, None if report.demo_weights is None else bool(report.demo_weights),
            report.device, report.load_seconds, report.error, self._db_time(report.started_at), self._db_time(report.last_seen_at),
        )  # fmt: skip
        updates = ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS[1:])
        with self._transaction(write=True) as tx:  # type: ignore[attr-defined]
            tx.execute(
                f"INSERT INTO worker_reports ({', '.join(_COLUMNS)}) VALUES ({placeholders(len(_COLUMNS))}) ON CONFLICT (name) DO UPDATE SET {updates}",
                values,
            )

    def list_worker_reports(self) -> list[WorkerReport]:
        with self._transaction(write=False) as tx:  # type: ignore[attr-defined]
            rows = tx.all(f"SELECT {', '.join(_COLUMNS)} FROM worker_reports ORDER BY last_seen_at DESC, name")
        return [self._worker_report(row) for row in rows]

    def remove_worker_reports(self, seen_before: datetime) -> int:
        with self._transaction(write=True) as tx:  # type: ignore[attr-defined]
            return tx.execute("DELETE FROM worker_reports WHERE last_seen_at < ?", (self._db_time(seen_before),))

    def remove_worker_report(self, name: str) -> bool:
        with self._transaction(write=True) as tx:  # type: ignore[attr-defined]
            return bool(tx.execute("DELETE FROM worker_reports WHERE name = ?", (name,)))

    def _worker_report(self, row: tuple) -> WorkerReport:
        (name, hostname, pid, queues, ok, model_name, model_version, digest, demo, device, load_s, error, started, seen) = row
        return WorkerReport(
            name=name, hostname=hostname, pid=int(pid), queues=tuple(q for q in queues.split(",") if q), model_ok=bool(ok),
            started_at=self._py_time(started), last_seen_at=self._py_time(seen),
            model_name=model_name, model_version=model_version, model_digest=digest,
            demo_weights=None if demo is None else bool(demo), device=device,
            load_seconds=None if load_s is None else float(load_s), error=error,
        )  # fmt: skip
