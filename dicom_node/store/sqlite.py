"""SQLite backend (embedded mode): one file, safe for several processes.

WAL mode lets readers work while one writer commits; every write transaction starts with
``BEGIN IMMEDIATE`` so it takes the database's write lock up front (a deferred transaction that
upgrades to a writer can fail at once with SQLITE_BUSY instead of waiting), and the busy timeout
makes the other processes wait for it. ``synchronous=FULL`` by default because the SCP acknowledges
an instance only after its row is committed: the commit must survive a power loss, not only a
crash (``?synchronous=normal`` in the URL relaxes that, see :mod:`dicom_node.store`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from dicom_node.store.base import StoreConflict, StoreError, StoreUnavailable
from dicom_node.store.connections import ThreadConnections
from dicom_node.store.sql_store import SqlStore, Tx

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%f+00:00"  # fixed width, so text order is time order


class SqliteStore(SqlStore):
    dialect = "sqlite"
    lock_row_sql = ""  # BEGIN IMMEDIATE already holds the only write lock
    schema_version_ddl = (
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )

    def __init__(self, path: str | Path, busy_timeout_s: float = 15.0, synchronous: str = "full") -> None:
        if synchronous not in ("full", "normal"):
            raise ValueError(f"synchronous = {synchronous!r}: use full or normal")
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self.synchronous = synchronous
        self._connections: ThreadConnections[sqlite3.Connection] = ThreadConnections(self._connect, _close)

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves (the module's implicit
            # transactions would not be IMMEDIATE). check_same_thread=False only so that close()
            # may close every thread's connection; each connection is still used by one thread.
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
            conn.execute("PRAGMA foreign_keys = ON")
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"cannot open the SQLite database {self.path}: {exc}") from exc
        return conn

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[Tx]:
        conn = self._connections.get()
        with self._translated_errors():
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield Tx(conn.cursor(), "?")
            except BaseException:
                conn.rollback()
                raise
            conn.execute("COMMIT")

    def _migration_transaction(self) -> Iterator[Tx]:
        return self._transaction(write=True)  # the write lock serialises concurrent starters

    @contextmanager
    def _translated_errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.IntegrityError as exc:
            raise StoreConflict(f"{self.path}: {exc}") from exc
        except sqlite3.OperationalError as exc:  # locked past the busy timeout, disk full, I/O error
            raise StoreUnavailable(f"SQLite database {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:  # e.g. "file is not a database": not transient
            raise StoreError(f"SQLite database {self.path}: {exc}") from exc

    def _db_time(self, value: datetime) -> str:
        return value.astimezone(timezone.utc).strftime(_TIME_FORMAT)

    def _py_time(self, value: str) -> datetime:
        return datetime.fromisoformat(value).astimezone(timezone.utc)

    def close(self) -> None:
        self._connections.close_all()


def _close(conn: sqlite3.Connection) -> None:
    conn.close()

