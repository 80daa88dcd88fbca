"""State store: :func:`open_store` picks the backend from the database URL and migrates it.

``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` (embedded default) and
``postgresql://user@host:port/dbname`` (production).

Durability: by default every commit reaches the disk before the SCP acknowledges (SQLite
``synchronous=FULL``, PostgreSQL ``synchronous_commit=on``). ``sqlite:///path.db?synchronous=normal``
trades that for ~7x the commit rate: still safe when a process is killed, but a power loss or kernel
crash can lose the last commits (the spooled files survive; their rows would not). The PostgreSQL
equivalent is ``?options=-c%20synchronous_commit%3Doff`` in the URL. The interface is :class:`~dicom_node.store.base.Store`.
"""

from __future__ import annotations

from dicom_node.store.base import Store, StoreConflict, StoreError, StoreUnavailable

__all__ = ["open_store", "Store", "StoreError", "StoreUnavailable", "StoreConflict"]


def open_store(url: str, migrate: bool = True) -> Store:
    """Open the store named by ``url`` and (by default) apply pending migrations.

    Safe to call from several processes at once; each process (and thread) gets its own connection.
    Raises StoreError for a URL of the wrong form, StoreUnavailable when the database cannot be reached.
    """
    store: Store
    if url.startswith("sqlite:///"):
        from dicom_node.store.sqlite import SqliteStore

        path, _, query = url[len("sqlite:///") :].partition("?")
        if not path or path == ":memory:":
            raise StoreError(f"database url {url!r}: name a file, e.g. sqlite:///var/anatomix.db (several processes share it)")
        store = SqliteStore(path, synchronous=_sqlite_synchronous(url, query))
    elif url.startswith(("postgresql://", "postgres://")):
        from dicom_node.store.postgres import PostgresStore

        store = PostgresStore(url)
    else:
        raise StoreError(f"database url {url!r}: use sqlite:///PATH or postgresql://USER@HOST:PORT/DBNAME")
    if migrate:
        try:
            store.migrate()
        except BaseException:
            store.close()
            raise
    return store


def _sqlite_synchronous(url: str, query: str) -> str:
    """The ``synchronous`` mode from a SQLite URL's query (``full`` unless it says ``normal``)."""
    if not query:
        return "full"
    key, _, value = query.partition("=")
    if key != "synchronous" or value.lower() not in ("full", "normal"):
        raise StoreError(f"database url {url!r}: the only SQLite option is ?synchronous=full (default) or ?synchronous=normal")
    return value.lower()
