"""The HTTP service of ``serve``: uvicorn in its own process, so that no request ever slows C-STORE.

``serve`` binds the port itself (:func:`open_http_socket`, so a port in use is a clear start-up
error), then runs :func:`run_http_service` as one of its background loops: it starts the API in a
*spawned* process (a fresh interpreter: nothing inherited from the forking, threaded parent),
hands it the bound socket, starts it again if it dies, and stops it with SIGTERM at shutdown.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import threading

from dicom_node.settings import Settings

log = logging.getLogger("dicom_node.api")

#: Seconds the HTTP process gets to finish its requests at shutdown.
STOP_S = 10.0


class HttpPortInUse(OSError):
    pass


def open_http_socket(settings: Settings) -> socket.socket | None:
    """The API's listening socket, or None when ``http.port`` is 0 (no HTTP service)."""
    if settings.http.port == 0:
        return None
    family = socket.AF_INET6 if ":" in settings.http.bind_address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.http.bind_address, settings.http.port))
    except OSError as exc:
        sock.close()
        raise HttpPortInUse(
            f"cannot listen for HTTP on {settings.http.bind_address}:{settings.http.port}: {exc.strerror or exc} "
            "(another process has it? set http.port or --http-port, 0 turns the API off)"
        ) from None
    sock.listen(128)
    return sock


def http_main(settings: Settings, sock: socket.socket) -> None:
    """Body of the HTTP process."""
    import uvicorn

    from dicom_node.api.metrics import ENV, count_audit_event
    from dicom_node.audit.trail import LISTENERS
    from dicom_node.logging_setup import configure_logging
    from dicom_node.store import open_store
    from dicom_node.web.app import create_app

    configure_logging(settings.logging.level)
    if os.environ.get(ENV) and count_audit_event not in LISTENERS:
        # A spawned process inherits serve's metrics directory but not its audit listener: STOW-RS counts here.
        LISTENERS.append(count_audit_event)
    store = open_store(settings.database_url, migrate=False)
    app = create_app(settings, store)
    # No access log: request lines carry study UIDs; errors are logged by the app itself.
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", server_header=False)
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    log.info("HTTP API listening on http://%s:%d (OpenAPI at /openapi.json)", host, port)
    try:
        server.run(sockets=[sock])
    finally:
        store.close()


def run_http_service(settings: Settings, sock: socket.socket, stop: threading.Event) -> None:
    """``serve``'s loop: keep one HTTP process running until ``stop`` is set."""
    context = multiprocessing.get_context("spawn")
    process = None
    try:
        while not stop.is_set():
            if process is None or not process.is_alive():
                if process is not None:
                    log.error("HTTP API process exited with status %s: starting it again", process.exitcode)
                process = context.Process(target=http_main, args=(settings, sock), name="anatomix-http", daemon=True)
                process.start()
            stop.wait(1.0)
    finally:
        if process is not None and process.is_alive():
            process.terminate()
            process.join(STOP_S)
            if process.is_alive():
                process.kill()
                process.join(5)
        sock.close()
