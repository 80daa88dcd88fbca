"""Running the SCP in several processes on one port, supervised by the serve process.

pynetdicom decodes PDUs in Python under the GIL, so one process handles about half of what DCMTK's
storescp does; ingest scales with processes, not threads. The serve process binds and listens
once (so "port in use" is detected before anything starts, and a second node can never silently
share our port the way SO_REUSEPORT would allow), then forks ``node.scp_processes`` children that
all accept on the inherited socket. An idle child wins the race for the next connection, which
balances load better than SO_REUSEPORT's hash of the peer address. Each child builds its own AE and
its own state store connection; the parent restarts a child that dies and forwards SIGTERM.

Each child's server is guarded (:func:`make_scp_server`, :mod:`dicom_node.net.guard`): connection
limits at accept, the A-ASSOCIATE-RQ read under a deadline and a size cap before pynetdicom sees
the connection, per-PDU caps after, and a housekeeping thread that writes the aggregated audit once
per window, refreshes which hosts are configured sources, and applies the audit retention.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.net.guard import GuardedRequestHandler, PortGuard
from dicom_node.settings import Settings
from dicom_node.store.base import StoreError
from dicom_node.store.hosts import is_ip_literal

if TYPE_CHECKING:
    from dicom_node.net.scp import StorageScp

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class PortInUse(OSError):
    """The SCP port is taken by another program."""


def open_listening_socket(bind_address: str, port: int, backlog: int = 128) -> socket.socket:
    """Bind and listen on ``bind_address:port``; PortInUse with a message that says what to do."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # SO_REUSEADDR only skips TIME_WAIT leftovers of our own previous run; it does not share a live port.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bind_address, port))
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            raise PortInUse(
                exc.errno,
                f"cannot listen on {bind_address}:{port}: {os.strerror(exc.errno)}; stop the program using it or choose another port (--port or node.port)",
            ) from None
        raise
    sock.listen(backlog)
    # Non-blocking: several processes wait on it and only one wins each accept(); the losers get
    # EAGAIN (ignored by socketserver) instead of blocking their serve loop.
    sock.setblocking(False)
    return sock


class InheritedSocketServer(ThreadedAssociationServer):
    """pynetdicom's threaded server on a socket that the parent already bound and listens on.

    With a ``guard``, every accepted connection passes its gate (:meth:`verify_request`) and the
    guarded request handler; ``housekeeping`` is stopped (and flushes) when the server shuts down.
    With a ``tls_context`` (DICOM TLS port) the guarded handler does the TLS handshake in the
    connection's thread under the establishment deadline; pynetdicom's own ``ssl_context`` stays
    unset, because its ``get_request`` would do the handshake in the accept loop, where one stalled
    client blocks every other connection.
    """

    def __init__(
        self,
        *args,
        listen_socket: socket.socket,
        guard: PortGuard | None = None,
        housekeeping: PortHousekeeping | None = None,
        tls_context: ssl.SSLContext | None = None,
        **kwargs,
    ) -> None:
        if tls_context is not None and guard is None:
            raise ValueError("a TLS port needs the guarded handler (it does the handshake)")
        self._listen_socket = listen_socket
        self.guard = guard
        self.housekeeping = housekeeping
        self.tls_context = tls_context
        if guard is not None:
            kwargs.setdefault("request_handler", GuardedRequestHandler)
        super().__init__(*args, **kwargs)

    def verify_request(self, request, client_address) -> bool:
        """Admit the connection under the connection limits; a refused one is closed at once."""
        if self.guard is None:
            return True
        return self.guard.admit(request, str(client_address[0]), tls=self.tls_context is not None)

    def server_bind(self) -> None:
        if self.socket is not None:
            self.socket.close()  # the fresh socket socketserver made; we use the inherited one
        self.socket = self._listen_socket
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """Already listening (in the parent)."""

    def server_close(self) -> None:
        # Never shutdown() the shared listening socket: that would stop every sibling process too.
        if self.socket is not None:
            self.socket.close()

    def shutdown(self) -> None:
        """Stop the accept loop and close our copy of the socket.

        pynetdicom's own shutdown() also removes the server from the AE's list of servers it
        started; this one was made with ``make_server`` and is not in that list.
        """
        socketserver.BaseServer.shutdown(self)
        self.server_close()
        if self.housekeeping is not None:
            self.housekeeping.stop()


class PortHousekeeping:
    """One thread per SCP process: aggregated audit per window, source hosts, audit retention."""

    TRUSTED_REFRESH_S = 30.0
    RETENTION_EVERY_S = 3600.0

    def __init__(self, guard: PortGuard, scp: StorageScp) -> None:
        self.guard = guard
        self.scp = scp
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scp-housekeeping", daemon=True)

    def start(self) -> None:
        # Before the first connection, without waiting on DNS: configured IP addresses get their
        # reserved slots now, host names once the housekeeping thread has resolved them (its first act).
        self.refresh_trusted(resolve=False)
        self._thread.start()

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.guard.aggregate.flush()

    def refresh_trusted(self, resolve: bool = True) -> None:
        """Reload the configured sources; resolve their host names (``resolve``: in this thread,
        never an accepting one) into the store's cache that acceptance reads, and reserve
        connection slots for their addresses."""
        try:
            nodes = self.scp.store.list_remote_nodes()
        except StoreError as exc:
            log.warning("could not read configured sources for reserved connection slots: %s", exc)
            return
        # A wildcard source ("*", any host) names no address to reserve slots for: use limits.trusted_hosts.
        hosts = [n.host for n in nodes if n.is_source and n.host not in ("", "*", None)]
        names = [h for h in hosts if not is_ip_literal(h)]
        cache = self.scp.store.host_addresses
        if resolve:
            cache.resolve_now(names)
        self.guard.gate.set_trusted_ips({h for h in hosts if is_ip_literal(h)} | cache.cached(names))

    def purge_audit(self) -> int:
        days = self.guard.limits.audit_retention_days
        if days <= 0:
            return 0
        try:
            removed = self.scp.store.purge_audit_events(datetime.now(UTC) - timedelta(days=days))
        except StoreError as exc:
            log.error("audit retention: could not delete old audit rows: %s", exc)
            return 0
        if removed:
            log.info("audit retention: deleted %d audit row(s) older than %d days", removed, days)
        return removed

    def _run(self) -> None:
        self.refresh_trusted()  # resolves the source host names (start did not wait for DNS)
        now = time.monotonic()
        next_flush = now + self.guard.limits.audit_window_s
        next_refresh = now + self.TRUSTED_REFRESH_S
        next_purge = now
        while not self._stop.wait(min(1.0, self.guard.limits.audit_window_s)):
            now = time.monotonic()
            if now >= next_flush:
                self.guard.aggregate.flush()
                next_flush = now + self.guard.limits.audit_window_s
            if now >= next_refresh:
                self.refresh_trusted()
                next_refresh = now + self.TRUSTED_REFRESH_S
            if now >= next_purge:
                self.purge_audit()
                next_purge = now + self.RETENTION_EVERY_S


def make_scp_server(settings: Settings, scp: StorageScp, listen_socket: socket.socket) -> InheritedSocketServer:
    """The guarded server of one SCP process on the inherited listening socket (housekeeping started)."""
    return make_scp_servers(settings, scp, [(listen_socket, None)])[0]


def make_scp_servers(settings: Settings, scp: StorageScp, listen_sockets: list[tuple[socket.socket, ssl.SSLContext | None]]) -> list[InheritedSocketServer]:
    """One guarded server per listening socket (plain, TLS with its context) of one SCP process.

    They share the AE, the connection limits (per process, both ports together) and the housekeeping.
    """
    from dicom_node.net.scp import build_ae

    ae = build_ae(settings)
    guard = PortGuard(settings.limits, scp.aggregate)
    housekeeping = PortHousekeeping(guard, scp)
    servers: list[InheritedSocketServer] = []
    for listen_socket, tls_context in listen_sockets:
        server = ae.make_server(
            scp_address(settings), evt_handlers=scp.event_handlers(), server_class=InheritedSocketServer,
            listen_socket=listen_socket, guard=guard, housekeeping=housekeeping, tls_context=tls_context,
        )  # fmt: skip
        if not isinstance(server, InheritedSocketServer):  # make_server builds the server_class it is given
            raise TypeError(f"pynetdicom made a {type(server).__name__}, not an InheritedSocketServer")
        servers.append(server)
    housekeeping.start()
    return servers


def set_parent_death_signal(signum: int = signal.SIGTERM) -> None:
    """Linux: have the kernel send us ``signum`` when the parent dies, so no orphan keeps the port."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    except (OSError, AttributeError):
        log.debug("prctl(PR_SET_PDEATHSIG) not available; orphaned SCP children stop only on SIGTERM")


def serve_until_stopped(server: ThreadedAssociationServer | list[ThreadedAssociationServer], stop: threading.Event, drain_s: float) -> None:
    """Run the accept loop(s) until ``stop``; then let running associations finish for up to ``drain_s``."""
    servers = server if isinstance(server, list) else [server]
    loops = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.2}, name=f"scp-accept-{i}", daemon=True) for i, s in enumerate(servers)]
    for loop in loops:
        loop.start()
    while not stop.wait(0.5):
        if not all(loop.is_alive() for loop in loops):
            raise RuntimeError("the SCP accept loop ended unexpectedly")
    for each in servers:
        each.shutdown()  # stops accepting; also closes our copy of the listening socket
    deadline = time.monotonic() + drain_s
    while any(s.active_associations for s in servers) and time.monotonic() < deadline:
        time.sleep(0.1)


@dataclass
class ScpSupervisor:
    """Forks ``count`` SCP children running ``child_main(index)``; restarts the ones that die."""

    count: int
    child_main: Callable[[int], int]
    restart_backoff_s: float = 1.0
    children: dict[int, int] = field(default_factory=dict)  # pid -> index
    _stopping: bool = False
    _restarts: int = 0

    def start(self) -> None:
        for index in range(self.count):
            self._fork(index)

    def _fork(self, index: int) -> None:
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops us
                set_parent_death_signal()
                code = self.child_main(index)
            except BaseException:  # process boundary: report, then leave without running the parent's cleanup
                log.exception("SCP process %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = index
        log.info("SCP process %d started (pid %d)", index, pid)

    def poll(self) -> None:
        """Reap exited children and restart them (unless stopping)."""
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            index = self.children.pop(pid, None)
            if index is None:
                continue  # not ours (e.g. a subprocess of a background loop)
            if self._stopping:
                continue
            self._restarts += 1
            log.error("SCP process %d (pid %d) exited with status %s; restarting", index, pid, _describe_wait_status(status))
            time.sleep(min(self.restart_backoff_s * self._restarts, 10.0))
            self._fork(index)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM every child, wait for them, SIGKILL stragglers."""
        self._stopping = True
        for pid in list(self.children):
            _signal_quietly(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while self.children and time.monotonic() < deadline:
            for pid in list(self.children):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    self.children.pop(pid, None)
            time.sleep(0.05)
        for pid in list(self.children):
            log.warning("SCP process pid %d did not stop in %.0f s; killing it", pid, timeout_s)
            _signal_quietly(pid, signal.SIGKILL)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            self.children.pop(pid, None)


def _signal_quietly(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _describe_wait_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return str(os.waitstatus_to_exitcode(status))


def scp_address(settings: Settings) -> tuple[str, int]:
    return settings.node.bind_address, settings.node.port
