"""Tokens bound to source nodes in the state store (issue 23; table ``source_tokens`` of migration 0011).

A source token lets a remote node send by STOW-RS: the node it is bound to is the sender, as the
AE title and host are for C-STORE. Only the token's SHA-256 is stored. Portable SQL mixed into
:class:`~dicom_node.store.sql_store.SqlStore` (its ``_transaction``, ``_db_time`` and ``_py_time``).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from dicom_node.store.base import SourceToken, SourceTokenStore
from dicom_node.store.sql_common import require_aware

_COLUMNS = "id, node_name, label, created_at, last_used_at, revoked_at"


class SourceTokenSql(SourceTokenStore):
    """Portable SQL for :class:`~dicom_node.store.base.SourceTokenStore`."""

    if TYPE_CHECKING:  # SqlStore's hooks, which this mixin uses

        def _transaction(self, write: bool) -> Any: ...
        def _db_time(self, value: datetime) -> Any: ...
        def _py_time(self, value: Any) -> datetime: ...

    def _source_token(self, row: tuple) -> SourceToken:
        id_, node, label, created, used, revoked = row
        return SourceToken(
            int(id_), node, label, self._py_time(created), None if used is None else self._py_time(used),
            None if revoked is None else self._py_time(revoked),
        )  # fmt: skip

    def add_source_token(self, node_name: str, label: str, token_hash: str, at: datetime) -> SourceToken:
        created = self._db_time(require_aware("at", at))
        with self._transaction(write=True) as tx:
            if tx.one("SELECT 1 FROM remote_nodes WHERE name = ?", (node_name,)) is None:
                raise KeyError(node_name)
            tx.execute("INSERT INTO source_tokens (node_name, label, token_hash, created_at) VALUES (?, ?, ?, ?)",
                       (node_name, label, token_hash, created))  # fmt: skip
            row = tx.one(f"SELECT {_COLUMNS} FROM source_tokens WHERE token_hash = ?", (token_hash,))
        return self._source_token(row)

    def find_source_token(self, token_hash: str, now: datetime) -> SourceToken | None:
        with self._transaction(write=True) as tx:
            row = tx.one(f"SELECT {_COLUMNS} FROM source_tokens WHERE token_hash = ? AND revoked_at IS NULL", (token_hash,))
            if row is None:
                return None
            tx.execute("UPDATE source_tokens SET last_used_at = ? WHERE id = ?", (self._db_time(require_aware("now", now)), row[0]))
        return self._source_token(row)

    def list_source_tokens(self, node_name: str | None = None) -> list[SourceToken]:
        where, params = ("WHERE node_name = ? ", [node_name]) if node_name is not None else ("", [])
        with self._transaction(write=False) as tx:
            return [self._source_token(r) for r in tx.all(f"SELECT {_COLUMNS} FROM source_tokens {where}ORDER BY id", params)]

    def revoke_source_token(self, token_id: int, at: datetime) -> bool:
        with self._transaction(write=True) as tx:
            return tx.execute("UPDATE source_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                              (self._db_time(require_aware("at", at)), int(token_id))) > 0  # fmt: skip
