"""SQLite backend (embedded mode): one file, safe for several processes.

WAL mode lets readers work while one writer commits; every write transaction starts with
``BEGIN IMMEDIATE`` so it takes the database's write lock up front (a deferred transaction that
upgrades to a writer can fail at once with SQLITE_BUSY instead of waiting), and the busy timeout
makes the other processes wait for it. ``synchronous=FULL`` by default because the SCP acknowledges
an instance only after its row is committed: the commit must survive a power loss, not only a
crash (``?synchronous=normal`` in the URL relaxes that, see :mod:`dicom_node.store`).
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path

from dicom_node.store.base import StoreConflict, StoreError, StoreUnavailable
from dicom_node.store.connections import ThreadConnections
from dicom_node.store.sql_store import SqlStore, Tx

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%f+00:00"  # fixed width, so text order is time order


class SqliteStore(SqlStore):
    dialect = "sqlite"
    lock_row_sql = ""  # BEGIN IMMEDIATE already holds the only write lock
    schema_version_ddl = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"

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
            self._enter_wal(conn)
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
            conn.execute("PRAGMA foreign_keys = ON")
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"cannot open the SQLite database {self.path}: {exc}") from exc
        return conn

    def _enter_wal(self, conn: sqlite3.Connection) -> None:
        """Put the database in WAL mode, waiting out other processes that are starting too.

        WAL is persistent, so only the first start really switches; every later connection just
        reads the mode. The switch needs an exclusive lock, and SQLite may answer SQLITE_BUSY at
        once instead of calling the busy handler (it does so when waiting could deadlock, for
        instance while another starter holds the lock to create the file or run migrations), so
        the busy timeout alone does not cover several processes starting at the same moment: retry
        with a short back-off until the timeout is spent.
        """
        deadline = time.monotonic() + self.busy_timeout_s
        delay = 0.005
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
                if str(mode).lower() != "wal":
                    conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.25)

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

    def _migration_transaction(self) -> AbstractContextManager[Tx]:
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
        return value.astimezone(UTC).strftime(_TIME_FORMAT)

    def _py_time(self, value: str) -> datetime:
        return datetime.fromisoformat(value).astimezone(UTC)

    def close(self) -> None:
        self._connections.close_all()


def _close(conn: sqlite3.Connection) -> None:
    conn.close()


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text
