"""Forward the audit trail to an ATNA audit record repository (syslog over TCP or TLS).

The spool is the state store: while forwarding is configured, every audit insert (from any SCP
process, worker or CLI command) queues its event id in ``audit_outbox`` in the same transaction.
:class:`AuditForwarder` runs as a thread of ``serve``; it takes the oldest queued events, sends each
as one RFC 5424 message with RFC 6587 octet counting over one connection, then half-closes the
connection and waits for the repository to close its side (TCP) or to answer the TLS close_notify
(TLS): only then are the events removed from the outbox. A repository that is down, refuses, or
stalls costs retries with capped back-off, never an event and never a C-STORE (the SCP processes
only insert a row; nothing they do waits for the network). Delivery is at least once; a message's
structured data carries the event id (``eventId``) for the repository to drop duplicates.

Log lines here carry event ids, counts and the repository address, never an event's content.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
from dataclasses import replace
from pathlib import Path

from dicom_node.audit.atna import PatientLookup, SourceInfo, audit_message, local_hostname, octet_counted, syslog_message
from dicom_node.settings import Settings
from dicom_node.store.base import AuditEvent, Store, StoreError

log = logging.getLogger(__name__)

#: Seconds between looks at an empty outbox.
POLL_S = 1.0
DEFAULT_PORTS = {"tcp": 601, "tls": 6514}


def forwarding_target(settings: Settings) -> str | None:
    """``transport://host:port`` of the configured repository, None when forwarding is off."""
    audit = settings.audit
    if not audit.syslog_host:
        return None
    port = audit.syslog_port or DEFAULT_PORTS[audit.transport]
    return f"{audit.transport}://{audit.syslog_host}:{port}"


def configure_forwarding(settings: Settings, store: Store) -> str | None:
    """Turn queueing on or off in the store to match the settings; returns the target."""
    target = forwarding_target(settings)
    store.set_audit_forwarding(target)
    if target:
        log.info("audit trail forwarded to %s (%d event(s) queued)", target, store.audit_outbox_size())
    return target


class AuditForwarder:
    """Drains the store's audit outbox to the repository; ``run(stop)`` until the event is set."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.audit = settings.audit
        self.store = store
        self.port = self.audit.syslog_port or DEFAULT_PORTS[self.audit.transport]
        hostname = local_hostname()
        self.source = SourceInfo(
            audit_source_id=self.audit.audit_source_id or settings.node.ae_title, ae_title=settings.node.ae_title,
            hostname=hostname, enterprise_site_id=self.audit.enterprise_site_id, app_name=self.audit.app_name,
        )  # fmt: skip
        self.hostname = hostname
        self.patients = PatientLookup(self._study_file)
        self._ssl = self._ssl_context() if self.audit.transport == "tls" else None
        #: Events confirmed by the repository since start, and failed tries (for status and tests).
        self.forwarded = 0
        self.failures = 0

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.audit.ca_file or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # BCP 195
        if self.audit.cert_file:
            context.load_cert_chain(self.audit.cert_file, self.audit.key_file)
        return context

    def _study_file(self, study_instance_uid: str) -> Path | None:
        instances = self.store.list_instances(study_instance_uid)
        return self.settings.storage.spool_dir / instances[0].path if instances else None

    def run(self, stop: threading.Event) -> None:
        delay = 0.0
        while not stop.is_set():
            try:
                batch = self.store.audit_outbox(self.audit.batch_size)
            except StoreError as exc:
                log.error("audit forwarding: cannot read the outbox: %s", exc)
                stop.wait(min(self.audit.retry_max_s, 5.0))
                continue
            if not batch:
                stop.wait(POLL_S)
                continue
            if self.forward(batch):
                delay = 0.0
                continue
            delay = min(self.audit.retry_max_s, max(1.0, delay * 2))
            stop.wait(delay)

    def forward(self, batch: list[AuditEvent]) -> bool:
        """Send one batch and wait for the repository's confirmation; True once it is out of the outbox."""
        ids = [int(e.id) for e in batch if e.id is not None]
        frames = []
        for event in batch:
            try:
                xml, severity = audit_message(event, self.source, self.patients)
            except Exception:  # a row we cannot render must not hold up the rest: sent as a bare alert
                log.exception("audit forwarding: event %s (%s) could not be rendered in full", event.id, event.event)
                xml, severity = audit_message(replace(event, event="unrenderable_event", detail={}), self.source)
            frames.append(octet_counted(syslog_message(event, xml, severity, self.hostname, self.audit.app_name, os.getpid())))
        try:
            self._send(b"".join(frames))
        except (OSError, ssl.SSLError) as exc:
            self.failures += 1
            log.warning("audit forwarding to %s:%d failed (%d event(s) kept for retry, ids %d-%d): %s",
                        self.audit.syslog_host, self.port, len(ids), min(ids), max(ids), exc)  # fmt: skip
            try:
                self.store.audit_outbox_failed(ids, str(exc))
            except StoreError as store_exc:
                log.error("audit forwarding: cannot note the failure: %s", store_exc)
            return False
        try:
            self.store.audit_outbox_done(ids)
        except StoreError as exc:  # sent again later: the repository de-duplicates by eventId
            log.error("audit forwarding: sent but not dequeued (will be sent again): %s", exc)
            return False
        self.forwarded += len(ids)
        log.debug("audit forwarding: %d event(s) confirmed by %s:%d", len(ids), self.audit.syslog_host, self.port)
        return True

    def _send(self, payload: bytes) -> None:
        timeout = self.audit.timeout_s
        raw = socket.create_connection((self.audit.syslog_host, self.port), timeout=timeout)
        try:
            if self._ssl is not None:
                tls = self._ssl.wrap_socket(raw, server_hostname=self.audit.syslog_host)
                tls.sendall(payload)
                # close_notify answered: the repository's TLS layer has read everything before it.
                plain = tls.unwrap()
                _await_close(plain)
            else:
                raw.sendall(payload)
                raw.shutdown(socket.SHUT_WR)
                _await_close(raw)
        finally:
            raw.close()


def _await_close(sock: socket.socket) -> None:
    """Read until the peer closes: it has read all we sent (a syslog receiver closes at our EOF)."""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return
