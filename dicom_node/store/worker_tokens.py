"""Worker tokens in the state store (issue 23; table ``worker_tokens`` of migration 0013).

An analyze worker on a host without the node's data directory and without database access
authenticates to the node's HTTP service with a worker token. The token is a 256-bit secret shown
once (``anatomix-node worker-token add NAME``); only its SHA-256 is stored. Portable SQL mixed into
:class:`~dicom_node.store.sql_store.SqlStore` (its ``_transaction``, ``_db_time`` and ``_py_time``).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from dicom_node.store.base import StoreConflict, WorkerToken, WorkerTokenStore
from dicom_node.store.sql_common import require_aware

_COLUMNS = "id, name, created_at, last_used_at, revoked_at"


class WorkerTokenSql(WorkerTokenStore):
    """Portable SQL for :class:`~dicom_node.store.base.WorkerTokenStore`."""

    if TYPE_CHECKING:  # SqlStore's value conversion hooks, which this mixin uses

        def _db_time(self, value: datetime) -> Any: ...
        def _py_time(self, value: Any) -> datetime: ...

    def _worker_token(self, row: tuple) -> WorkerToken:
        id_, name, created, used, revoked = row
        return WorkerToken(int(id_), name, self._py_time(created), None if used is None else self._py_time(used),
                           None if revoked is None else self._py_time(revoked))  # fmt: skip

    def add_worker_token(self, name: str, token_hash: str, at: datetime) -> WorkerToken:
        with self._transaction(write=True) as tx:  # type: ignore[attr-defined]
            if tx.one("SELECT 1 FROM worker_tokens WHERE name = ?", (name,)):
                raise StoreConflict(f"a worker token named {name!r} already exists (revoke it first, or pick another name)")
            tx.execute("INSERT INTO worker_tokens (name, token_hash, created_at) VALUES (?, ?, ?)",
                       (name, token_hash, self._db_time(require_aware("at", at))))  # fmt: skip
            row = tx.one(f"SELECT {_COLUMNS} FROM worker_tokens WHERE name = ?", (name,))
        return self._worker_token(row)

    def find_worker_token(self, token_hash: str, now: datetime) -> WorkerToken | None:
        with self._transaction(write=True) as tx:  # type: ignore[attr-defined]
            row = tx.one(f"SELECT {_COLUMNS} FROM worker_tokens WHERE token_hash = ? AND revoked_at IS NULL", (token_hash,))
            if row is None:
                return None
            tx.execute("UPDATE worker_tokens SET last_used_at = ? WHERE id = ?", (self._db_time(require_aware("now", now)), row[0]))
        return self._worker_token(row)

    def list_worker_tokens(self) -> list[WorkerToken]:
        with self._transaction(write=False) as tx:  # type: ignore[attr-defined]
            return [self._worker_token(row) for row in tx.all(f"SELECT {_COLUMNS} FROM worker_tokens ORDER BY name")]

    def revoke_worker_token(self, name: str, at: datetime) -> bool:
        with self._transaction(write=True) as tx:  # type: ignore[attr-defined]
            # The name is freed (kept with the revocation time) so a new token may take it.
            when = require_aware("at", at)
            return tx.execute("UPDATE worker_tokens SET revoked_at = ?, name = ? WHERE name = ? AND revoked_at IS NULL",
                              (self._db_time(when), f"{name} (revoked {when:%Y-%m-%dT%H:%M:%S.%f})", name)) > 0  # fmt: skip
