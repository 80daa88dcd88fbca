"""One database connection per thread and per process, never shared across ``fork``.

The SCP runs several processes and a Celery worker forks its children: a connection inherited
through ``fork`` shares its socket (or SQLite file locks) with the parent, so the child must open
its own. An inherited connection is also never *closed* in the child: closing a psycopg connection
sends a Terminate message on the parent's socket, and closing an inherited SQLite handle can drop
the parent's POSIX locks. The child just keeps a reference to it so garbage collection does not
close it either.

Threads come and go (pynetdicom serves each association in a new thread): the connection of a
thread that has ended is closed the next time any thread opens one, so a long-running SCP holds
about one connection per live association, not one per association ever served.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

Conn = TypeVar("Conn")


class ThreadConnections(Generic[Conn]):
    """Lazily opened connections, one per (process, thread)."""

    def __init__(self, connect: Callable[[], Conn], close: Callable[[Conn], None]) -> None:
        self._connect = connect
        self._close = close
        self._pid = os.getpid()
        self._local = threading.local()
        self._lock = threading.Lock()
        #: (owning thread, connection) for every connection this process opened.
        self._open: list[tuple[threading.Thread, Conn]] = []
        #: Connections inherited from a parent process: kept alive, never used, never closed.
        self._inherited: list[Conn] = []

    def get(self) -> Conn:
        """This thread's connection, opened on first use (and again after a fork)."""
        self._forget_parent_connections()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            self._close_ended_threads()
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._open.append((threading.current_thread(), conn))
        return conn

    def open_count(self) -> int:
        """Connections this process holds open now (for tests and metrics)."""
        with self._lock:
            return len(self._open)

    def _close_ended_threads(self) -> None:
        with self._lock:
            ended = [conn for thread, conn in self._open if not thread.is_alive()]
            self._open = [(thread, conn) for thread, conn in self._open if thread.is_alive()]
        for conn in ended:
            self._close(conn)

    def discard(self) -> None:
        """Close and forget this thread's connection (after it broke); the next get() reconnects."""
        self._forget_parent_connections()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            return
        self._local.conn = None
        with self._lock:
            self._open = [(thread, c) for thread, c in self._open if c is not conn]
        self._close(conn)

    def close_all(self) -> None:
        """Close every connection this process opened (from any thread)."""
        self._forget_parent_connections()
        with self._lock:
            conns, self._open = self._open, []
        self._local = threading.local()
        for _, conn in conns:
            self._close(conn)

    def _forget_parent_connections(self) -> None:
        pid = os.getpid()
        if pid == self._pid:
            return
        # We are a forked child: the parent's lock may have been held by a thread that does not
        # exist here, and its connections belong to the parent.
        self._lock = threading.Lock()
        self._inherited.extend(conn for _, conn in self._open)
        self._open = []
        self._local = threading.local()
        self._pid = pid
