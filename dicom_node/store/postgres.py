"""PostgreSQL backend (production), psycopg 3 with plain per-thread connections.

Connections are in autocommit mode and every store call runs in an explicit transaction, so no
session sits "idle in transaction". The connect timeout is short: the SCP must answer 0xA700
(out of resources, sender retries) quickly when the database is down, not hang the association.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import conninfo

from dicom_node.store.base import StoreConflict, StoreError, StoreUnavailable
from dicom_node.store.connections import ThreadConnections
from dicom_node.store.sql_store import SqlStore, Tx

#: Key of the advisory lock held while migrating (any constant unique to this application).
MIGRATION_LOCK_KEY = 0x414E41544F4D4958 >> 1  # "ANATOMIX", fits a signed bigint


class PostgresStore(SqlStore):
    dialect = "postgres"
    lock_row_sql = " FOR UPDATE"
    schema_version_ddl = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL)"

    def __init__(self, url: str, connect_timeout_s: int = 5) -> None:
        try:
            params = conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise StoreError(f"database.url {redact_url(url)!r} is not a valid PostgreSQL URL: {exc}") from exc
        self.url = url
        self._connect_kwargs: dict[str, object] = {"autocommit": True, "application_name": "anatomix-node"}
        if "connect_timeout" not in params:
            self._connect_kwargs["connect_timeout"] = connect_timeout_s
        self._connections: ThreadConnections[psycopg.Connection] = ThreadConnections(self._connect, _close)

    def __repr__(self) -> str:
        return f"PostgresStore({redact_url(self.url)!r})"

    def _connect(self) -> psycopg.Connection:
        try:
            conn = psycopg.connect(self.url, **self._connect_kwargs)
        except psycopg.Error as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StoreUnavailable(f"cannot connect to PostgreSQL at {redact_url(self.url)}: {reason}") from exc
        return conn

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[Tx]:
        conn = self._connections.get()
        with self._translated_errors(conn):
            with conn.transaction():
                yield Tx(conn.cursor(), "%s")

    @contextmanager
    def _migration_transaction(self) -> Iterator[Tx]:
        conn = self._connections.get()
        with self._translated_errors(conn):
            with conn.transaction():
                tx = Tx(conn.cursor(), "%s")
                # Held until commit: a second starter waits here, then finds the migrations applied.
                tx.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK_KEY,))
                yield tx

    @contextmanager
    def _translated_errors(self, conn: psycopg.Connection) -> Iterator[None]:
        try:
            yield
        except psycopg.IntegrityError as exc:
            raise StoreConflict(_first_line(exc)) from exc
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            # Server gone, connection lost, disk full, deadlock/serialisation failure: transient.
            if conn.closed or conn.broken:
                self._connections.discard()
            raise StoreUnavailable(f"PostgreSQL at {redact_url(self.url)}: {_first_line(exc)}") from exc
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL at {redact_url(self.url)}: {_first_line(exc)}") from exc

    def _db_time(self, value: datetime) -> datetime:
        return value.astimezone(UTC)

    def _py_time(self, value: datetime) -> datetime:
        return value.astimezone(UTC)

    def close(self) -> None:
        self._connections.close_all()


def _close(conn: psycopg.Connection) -> None:
    conn.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for messages and ``config show``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
