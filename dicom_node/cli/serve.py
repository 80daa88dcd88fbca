"""``anatomix-node serve``: the SCP processes plus the node's background loops, until SIGTERM/SIGINT.

Process layout::

    serve (parent)      binds the port, supervises, runs background loops (threads):
      |                   - assembly: receiving -> stable, selection, hand-off (on_stable)
      |                   - (pipeline: dispatch, embedded worker; added by their module)
      +-- scp-0..N-1    forked children: pynetdicom AE on the inherited socket, own store connection

Adding a loop is one entry in :func:`background_loops`; the analysis hand-off is the callable
returned by :func:`stable_study_handler`.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from dicom_node.audit import trail as audit
from dicom_node.audit.forward import configure_forwarding
from dicom_node.audit.trail import AuditTrail, open_audit_trail
from dicom_node.cli.pipeline import run_node_pipeline
from dicom_node.logging_setup import configure_logging
from dicom_node.net.scp import StorageScp, accept_unlisted_classes_in_this_process
from dicom_node.net.server import PortInUse, ScpSupervisor, make_scp_servers, open_listening_socket, serve_until_stopped
from dicom_node.ops.errors import UserError
from dicom_node.pipeline.assembly import OnStable, close_studies_at_release, run_assembly
from dicom_node.pipeline.reconcile import reconcile_spool
from dicom_node.pipeline.retention import run_retention
from dicom_node.settings import Settings, load_settings
from dicom_node.store import open_store
from dicom_node.store.base import Store, StoreError
from dicom_node.store.spool import prepare_spool

log = logging.getLogger("dicom_node.serve")

#: Seconds an SCP process waits for running associations to finish after SIGTERM.
DRAIN_S = 10.0


@dataclass
class BackgroundLoop:
    """A thread in the serve process: ``run(stop_event)`` returns when the event is set."""

    name: str
    run: Callable[[threading.Event], None]
    thread: threading.Thread | None = field(default=None, repr=False)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="run the DICOM node (SCP, assembly) until stopped")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="settings file (default: ./anatomix-node.toml, else /etc/anatomix/anatomix-node.toml, if present)")  # fmt: skip
    parser.add_argument("--port", type=int, default=None, help="DICOM port (default: node.port, 11112)")
    parser.add_argument("--ae-title", default=None, help="our AE title (default: node.ae_title, ANATOMIX)")
    parser.add_argument("--demo-weights", action="store_true",
                        help="analyse with tiny generated demo weights (model.demo_weights); every result says so")  # fmt: skip
    parser.add_argument("--http-port", type=int, default=None, help="operations API port (default: http.port, 8080; 0 = no API)")
    parser.set_defaults(func=run_serve)


def load_serve_settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    overrides: dict[str, object] = {}
    if args.port is not None:
        overrides["port"] = args.port
    if args.ae_title is not None:
        overrides["ae_title"] = args.ae_title
    if overrides:
        settings = settings.with_overrides(node=overrides)
    if getattr(args, "demo_weights", False):
        settings = settings.with_overrides(model={"demo_weights": True})
    if getattr(args, "http_port", None) is not None:
        settings = settings.with_overrides(http={"port": args.http_port})
    return settings


#: The lock file in ``storage.data_dir`` that a running ``serve`` holds (fcntl), with its pid inside.
LOCK_FILE_NAME = "anatomix-node.lock"


def lock_data_dir(data_dir: Path) -> IO[str]:
    """Hold an exclusive lock on ``data_dir`` for this node's lifetime, or raise UserError naming the holder.

    One node per data directory: two would share a spool, a database and leases and undo each
    other's work. The lock (flock) goes away with the process, so a crash leaves nothing to clean
    up; the SCP processes forked later inherit it, so it lasts until the last of them has stopped.
    """
    path = data_dir / LOCK_FILE_NAME
    try:
        handle = open(path, "a+", encoding="ascii")
    except OSError as exc:
        raise UserError(f"cannot open the lock file {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise UserError(
            f"data directory {data_dir} is in use by another node (anatomix-node serve, pid {holder}); "
            "one node per data directory: stop that one, or give this one its own storage.data_dir",
            code=1,
        ) from None
    try:  # the pid is for the refusal message; the lock itself is what counts
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
    except OSError as exc:  # a full disk: the node starts anyway and refuses instances with 0xA700
        log.warning("could not write the pid into %s: %s", path, exc.strerror or exc)
    os.set_inheritable(handle.fileno(), False)  # subprocesses (embedded workers) do not hold it
    return handle


def check_serve_model(settings: Settings) -> None:
    """Embedded mode (serve starts its own analyze worker): a configured model that cannot be used
    stops ``serve`` at start, in one line, rather than a node that quietly analyses nothing. No model
    at all is allowed: the node then receives and stores only. With a broker, the model lives on the
    worker hosts, which check it themselves."""
    from dicom_node.cli.pipeline import check_model_usable
    from dicom_node.pipeline.dispatch import model_configured

    if settings.embedded and model_configured(settings):
        check_model_usable(settings, settings.model.device)


def stable_study_handler(settings: Settings, store: Store) -> OnStable | None:
    """What happens to a stable study: the pipeline queues its analysis (or records why it cannot)."""
    from dicom_node.cli.pipeline import stable_study_handler as pipeline_handler

    return pipeline_handler(settings, store)


def background_loops(settings: Settings, store: Store, audit_trail: AuditTrail) -> list[BackgroundLoop]:
    on_stable = stable_study_handler(settings, store)
    loops = [
        BackgroundLoop("assembly", lambda stop: run_assembly(store, settings, stop, on_stable=on_stable, audit_trail=audit_trail)),
        BackgroundLoop("pipeline", lambda stop: run_node_pipeline(settings, stop)),
    ]
    if settings.storage.retention_days > 0:
        loops.append(BackgroundLoop("retention", lambda stop: run_retention(settings, store, audit_trail, stop)))
    if settings.audit.syslog_host:  # ATNA forwarding: its own thread, reading the store's outbox
        from dicom_node.audit.forward import AuditForwarder

        loops.append(BackgroundLoop("audit-forward", AuditForwarder(settings, store).run))
    return loops


def describe_model(settings: Settings) -> str:
    if settings.model.demo_weights:
        return f"demo weights ({settings.model.backend}, {settings.model.device})"
    if settings.model.dir is not None:
        return f"{settings.model.dir} ({settings.model.backend}, {settings.model.device})"
    return "none configured (receive only)"


def make_scp_child(settings: Settings, listen_sockets: list[tuple[socket.socket, bool]]) -> Callable[[int], int]:
    """The body of one forked SCP process: a guarded server per listening socket (``True``: the TLS port)."""

    def scp_child(index: int) -> int:
        # pynetdicom's negotiation, patched once here for this SCP process (process-wide, so not
        # in build_ae): private and newer storage classes are accepted, stored, never analysed.
        accept_unlisted_classes_in_this_process()
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
        store = open_store(settings.database_url, migrate=False)
        trail = open_audit_trail(store, settings.logging.audit_file)
        scp = StorageScp(
            settings,
            store,
            trail,
            on_release=lambda source, uids: close_studies_at_release(store, settings, source, uids, trail),
        )
        from dicom_node.net.tls import server_context  # each process its own context (nothing OpenSSL across fork)

        sockets = [(sock, server_context(settings) if is_tls else None) for sock, is_tls in listen_sockets]
        servers = make_scp_servers(settings, scp, sockets)
        log.debug("SCP process %d accepting", index)
        try:
            serve_until_stopped(servers, stop, DRAIN_S)
        finally:
            store.close()
        return 0

    return scp_child


def open_scp_sockets(settings: Settings, store: Store) -> list[tuple[socket.socket, bool]]:
    """The plain port (unless TLS only) and the TLS port (``tls.enabled``), bound and listening.

    The TLS files are loaded once here, so a wrong path or key stops ``serve`` in one line, and
    every certificate's expiry is logged (a warning within ``tls.expiry_warning_days``).
    """
    sockets: list[tuple[socket.socket, bool]] = []
    tls = settings.tls
    if tls.enabled:
        from dicom_node.net.tls import TlsConfigError, log_certificate_expiry, server_context

        try:
            server_context(settings)
        except TlsConfigError as exc:
            raise UserError(str(exc)) from None
        log_certificate_expiry(settings, store.list_remote_nodes())
    try:
        if not tls.enabled or tls.plain_port:
            sockets.append((open_listening_socket(settings.node.bind_address, settings.node.port), False))
        if tls.enabled:
            try:
                sockets.append((open_listening_socket(settings.node.bind_address, tls.port), True))
            except PortInUse as exc:
                raise UserError((exc.strerror or str(exc)).replace("(--port or node.port)", "(tls.port)")) from None
    except BaseException:
        for sock, _ in sockets:
            sock.close()
        raise
    return sockets


def describe_ports(settings: Settings) -> str:
    """``port 11112``, ``port 11112, TLS port 2762`` or ``TLS port 2762 only`` for the start-up line."""
    if not settings.tls.enabled:
        return f"port {settings.node.port}"
    if not settings.tls.plain_port:
        return f"TLS port {settings.tls.port} only"
    return f"port {settings.node.port}, TLS port {settings.tls.port}"


def log_where_results_go(store: Store) -> None:
    """At start-up: one line per destination results will go to, or a warning that they go nowhere."""
    from dicom_node.ops.remotes import where_results_go

    try:
        lines, nowhere = where_results_go(store.list_remote_nodes(), store.list_routing_rules())
    except StoreError as exc:
        log.warning("cannot say where results will go: the state store did not answer (%s)", exc)
        return
    for line in lines:
        log.info("results go to %s", line)
    if nowhere:
        log.warning("%s", nowhere)


def run_serve(args: argparse.Namespace) -> int:
    settings = load_serve_settings(args)
    configure_logging(args.log_level or settings.logging.level)
    check_serve_model(settings)
    try:
        settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create storage.data_dir {settings.storage.data_dir}: {exc.strerror or exc}") from None
    data_lock = lock_data_dir(settings.storage.data_dir)  # noqa: F841 - held until the process exits
    prepare_spool(settings.storage.spool_dir)
    store = open_store(settings.database_url)  # migrates once, before any child starts
    trail = open_audit_trail(store, settings.logging.audit_file)
    configure_forwarding(settings, store)  # before any process records an event to forward
    trail.record(audit.APPLICATION_STARTED, None, ae_title=settings.node.ae_title, port=settings.node.port, pid=os.getpid())
    # Before any SCP process exists: a file it is writing right now would look unrecorded.
    reconcile_spool(settings.storage.spool_dir, store, trail)
    try:
        listen_sockets = open_scp_sockets(settings, store)
    except (PortInUse, UserError) as exc:
        store.close()
        raise UserError(exc.strerror or str(exc)) if isinstance(exc, PortInUse) else exc from None

    # Operations API (dicom_node.api): its port is bound here, so a clash is reported at start; the
    # DICOM service runs without the API then (receiving must not depend on it). The metrics
    # directory is wiped and shared with every child before any of them starts.
    from dicom_node.api.metrics import prepare_multiprocess
    from dicom_node.web.server import HttpPortInUse, open_http_socket, run_http_service

    prepare_multiprocess(settings)
    try:
        http_socket = open_http_socket(settings)
    except HttpPortInUse as exc:
        log.error("%s; the DICOM service runs without the operations API", exc)
        http_socket = None

    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    # Fork the SCP processes before any thread starts, so they inherit no half-held lock.
    supervisor = ScpSupervisor(settings.node.scp_processes, make_scp_child(settings, listen_sockets))
    supervisor.start()  # the parent keeps listen_socket open (never accepting) to restart children
    loops = background_loops(settings, store, trail)
    if http_socket is not None:
        loops.append(BackgroundLoop("http", lambda stop_http: run_http_service(settings, http_socket, stop_http)))
    loop_stops = {loop.name: threading.Event() for loop in loops}
    for loop in loops:
        loop.thread = threading.Thread(target=loop.run, args=(loop_stops[loop.name],), name=loop.name, daemon=True)
        loop.thread.start()
    if os.geteuid() == 0:
        log.warning("running as root: run the node as its own user (the systemd units in deploy/systemd use `anatomix`)")
    store_kind = "PostgreSQL" if settings.database_url.startswith("postgres") else "SQLite"
    log.info(
        "AnatomiX node listening: AE %s, %s, %d SCP process(es), store %s, spool %s, model: %s, config: %s",
        settings.node.ae_title,
        describe_ports(settings),
        settings.node.scp_processes,
        store_kind,
        settings.storage.spool_dir,
        describe_model(settings),
        settings.source,
    )
    log_where_results_go(store)
    try:
        while not stop.wait(0.5):
            supervisor.poll()
    finally:
        stopping = time.monotonic()
        for loop in loops:
            loop_stops[loop.name].set()
        log.info("stopping: waiting for %d SCP process(es) to finish open associations (up to %.0f s)",
                 len(supervisor.children), DRAIN_S + 5)  # fmt: skip
        supervisor.stop(timeout_s=DRAIN_S + 5)
        running = [loop.name for loop in loops if loop.thread is not None and loop.thread.is_alive()]
        if running:
            log.info("stopping: waiting for %s (embedded workers finish their current task or hand it back)", ", ".join(running))
        for loop in loops:
            if loop.thread is not None:
                loop.thread.join(timeout=10)
        for listen_socket, _ in listen_sockets:
            listen_socket.close()
        trail.record(audit.APPLICATION_STOPPED, None, ae_title=settings.node.ae_title, pid=os.getpid())
        store.close()
        log.info("AnatomiX node stopped in %.1f s", time.monotonic() - stopping)
    return 0
