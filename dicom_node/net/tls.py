"""DICOM TLS (PS3.15 Annex B secure transport, BCP 195 / RFC 9325 guidance) for the SCP and as SCU.

- :func:`server_context`: the SCP's context from ``[tls]`` (TLS 1.2 at least, forward-secret AEAD
  suites, no compression or renegotiation; client certificates required or optional).
- :func:`handshake`: the server-side handshake of one accepted connection, run in that connection's
  handler thread (never in the accept loop, where pynetdicom's own server does it) under the same
  establishment deadline as the first PDU, so a client that stalls mid-handshake costs one thread
  and one connection slot until the deadline, and blocks nobody else.
- :func:`client_tls_args`: pynetdicom's ``tls_args`` for a remote node with ``tls`` (delivery, echo).
- :func:`certificate_status`: every configured certificate with its ``not_after`` and days left,
  for ``anatomix-node tls status``, the start-up log and the metrics/API.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dicom_node.settings import Settings, TlsSettings

log = logging.getLogger(__name__)

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


class TlsConfigError(ValueError):
    """A TLS file that cannot be used (missing, unreadable, not PEM, key not matching the certificate)."""


def resolve_path(settings: Settings, path: Path | str) -> Path:
    """A relative path in the settings file is relative to that file (as ``storage.data_dir`` is)."""
    path = Path(path).expanduser()
    if path.is_absolute() or settings.source == "defaults":
        return path
    return Path(settings.source).resolve().parent / path


def _harden(context: ssl.SSLContext, min_version: str, ciphers: str, key: str) -> None:
    context.minimum_version = _VERSIONS[min_version]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    try:
        context.set_ciphers(ciphers)
    except ssl.SSLError:
        raise TlsConfigError(f"{key} = {ciphers!r}: OpenSSL knows none of these cipher suites") from None


def _load_chain(context: ssl.SSLContext, certificate: Path, private_key: Path, what: str) -> None:
    for path, name in ((certificate, "certificate"), (private_key, "private key")):
        if not path.is_file():
            raise TlsConfigError(f"{what} {name} {path}: no such file")
    try:
        context.load_cert_chain(str(certificate), str(private_key))
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(
            f"{what} certificate {certificate} / key {private_key}: cannot be used ({exc}); "
            "give PEM files, an unencrypted key, and the key that belongs to the certificate"
        ) from None


def _load_cas(context: ssl.SSLContext, cafile: Path, what: str) -> None:
    if not cafile.is_file():
        raise TlsConfigError(f"{what} CA certificates {cafile}: no such file")
    try:
        context.load_verify_locations(cafile=str(cafile))
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"{what} CA certificates {cafile}: not usable PEM certificates ({exc})") from None


def server_context(settings: Settings) -> ssl.SSLContext:
    """The SCP's TLS context from ``[tls]``; TlsConfigError naming the file that is wrong."""
    tls = settings.tls
    if tls.certificate is None or tls.private_key is None:
        raise TlsConfigError("tls.enabled = true needs tls.certificate and tls.private_key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context, tls.min_version, tls.ciphers, "tls.ciphers")
    _load_chain(context, resolve_path(settings, tls.certificate), resolve_path(settings, tls.private_key), "tls")
    if tls.ca_certificates is not None:
        _load_cas(context, resolve_path(settings, tls.ca_certificates), "tls")
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_tls_args(node, settings: Settings | None = None) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom ``tls_args`` for a remote node (``RemoteNode``), or None when it has no TLS.

    Its certificate is verified against ``tls_ca_file`` (else the system's CAs) unless
    ``tls_verify_peer`` is off, and then its host name is checked too unless ``tls_check_hostname`` is
    off (a certificate that does not name the address we connect to, still signed by a trusted CA);
    our client certificate is presented when set.
    """
    if not node.tls:
        return None
    tls = settings.tls if settings is not None else TlsSettings()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(context, tls.min_version, tls.ciphers, "tls.ciphers")
    what = f"remote node {node.name}:"
    if node.tls_verify_peer:
        context.check_hostname = bool(getattr(node, "tls_check_hostname", True))
        context.verify_mode = ssl.CERT_REQUIRED
        if node.tls_ca_file:
            _load_cas(context, _node_path(settings, node.tls_ca_file), what)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if node.tls_cert_file or node.tls_key_file:
        if not (node.tls_cert_file and node.tls_key_file):
            raise TlsConfigError(f"{what} a client certificate needs both --tls-cert and --tls-key")
        _load_chain(context, _node_path(settings, node.tls_cert_file), _node_path(settings, node.tls_key_file), what)
    return context, node.host


def _node_path(settings: Settings | None, path: str) -> Path:
    return Path(path).expanduser() if settings is None else resolve_path(settings, path)


# ---- the server-side handshake, in the connection's thread ---------------------------------------------


def handshake(sock: socket.socket, context: ssl.SSLContext, deadline: float) -> tuple[ssl.SSLSocket | None, str]:
    """TLS-wrap an accepted socket and complete the handshake before ``deadline`` (time.monotonic).

    Returns ``(tls_socket, "")`` (blocking mode again, ready for the first PDU under the same deadline)
    or ``(None, kind)`` with the connection-event kind (``tls_handshake_timed_out`` or
    ``tls_handshake_failed``: no or an untrusted client certificate, a protocol or cipher mismatch,
    not TLS at all); on None the socket is closed. Non-blocking steps against one deadline: a client
    that trickles bytes cannot stretch it.
    """
    try:
        sock.setblocking(False)
        tls_sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    except (OSError, ValueError):
        sock.close()
        return None, "tls_handshake_failed"
    try:
        while True:
            try:
                tls_sock.do_handshake()
                break
            except ssl.SSLWantReadError:
                waits: tuple[list[ssl.SSLSocket], list[ssl.SSLSocket]] = ([tls_sock], [])
            except ssl.SSLWantWriteError:
                waits = ([], [tls_sock])
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                tls_sock.close()
                return None, "tls_handshake_timed_out"
            readable, writable, _ = select.select(*waits, [], remaining)
            if not readable and not writable and deadline - time.monotonic() <= 0:
                tls_sock.close()
                return None, "tls_handshake_timed_out"
    except (ssl.SSLError, OSError) as exc:
        log.debug("TLS handshake failed: %s", exc)
        tls_sock.close()
        return None, "tls_handshake_failed"
    tls_sock.setblocking(True)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("TLS %s %s, client certificate %s", tls_sock.version(), (tls_sock.cipher() or ("?",))[0], peer_subject(tls_sock))
    return tls_sock, ""


def peer_subject(tls_sock: ssl.SSLSocket) -> str | None:
    """The client certificate's subject as ``CN=...,O=...`` (None: no certificate presented)."""
    cert = tls_sock.getpeercert()
    if not cert:
        return None
    subject = cert.get("subject", ())
    if isinstance(subject, str):
        return subject
    return ",".join(f"{pair[0]}={pair[1]}" for rdn in subject for pair in rdn)


def association_client_certificate(assoc) -> str | None:
    """The subject of the trusted client certificate the association's peer presented, else None
    (a plain-port association, or a TLS one without a certificate: the port asks for one only when
    ``tls.ca_certificates`` is set, and a certificate it asked for was verified in the handshake)."""
    transport = getattr(getattr(assoc, "dul", None), "socket", None)
    sock = getattr(transport, "socket", None)
    return peer_subject(sock) if isinstance(sock, ssl.SSLSocket) else None


def client_certificate_refusal(source, assoc) -> str | None:
    """Why an association of ``source`` (a matched ``RemoteNode``) must be refused for want of a
    client certificate (its ``tls_client_certificate`` is ``required``), or None when it may go on."""
    if getattr(source, "tls_client_certificate", "optional") != "required":
        return None
    if association_client_certificate(assoc) is not None:
        return None
    transport = getattr(getattr(assoc, "dul", None), "socket", None)
    how = "over TLS" if isinstance(getattr(transport, "socket", None), ssl.SSLSocket) else "without TLS (on the plain port)"
    return (f"source {source.name} requires a client certificate (tls_client_certificate = required) and it connected {how} "
            "presenting none")  # fmt: skip


# ---- certificate expiry ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertificateStatus:
    """One certificate in a configured PEM file (the SCP's, a CA, a remote node's)."""

    role: str  # "scp certificate", "scp trusted CA", "remote NAME client certificate", "remote NAME trusted CA"
    path: str
    subject: str | None
    not_after: str | None  # ISO 8601 UTC
    days_left: float | None
    error: str | None = None  # the file cannot be read / parsed

    def warning(self, warn_days: int) -> str | None:
        if self.error is not None:
            return f"{self.role} {self.path}: {self.error}"
        if self.days_left is not None and self.days_left < 0:
            return f"{self.role} {self.path} ({self.subject}) EXPIRED on {self.not_after}"
        if self.days_left is not None and self.days_left < warn_days:
            return f"{self.role} {self.path} ({self.subject}) expires in {self.days_left:.0f} days, on {self.not_after}"
        return None


def read_certificates(path: Path, role: str, now: datetime | None = None) -> list[CertificateStatus]:
    """Every certificate in a PEM file with its subject and expiry (one error entry if unreadable)."""
    from cryptography import x509

    now = now or datetime.now(UTC)
    try:
        certificates = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as exc:
        return [CertificateStatus(role, str(path), None, None, None, error=f"cannot read: {exc.strerror or exc}")]
    except ValueError:
        return [CertificateStatus(role, str(path), None, None, None, error="no PEM certificate in it")]
    found = []
    for cert in certificates:
        not_after = cert.not_valid_after_utc
        found.append(CertificateStatus(
            role, str(path), cert.subject.rfc4514_string(), not_after.isoformat(timespec="seconds"),
            round((not_after - now).total_seconds() / 86400, 1),
        ))  # fmt: skip
    return found


def certificate_status(settings: Settings, nodes=(), now: datetime | None = None) -> list[CertificateStatus]:
    """The SCP's certificate and trusted CAs (when ``tls.enabled``), and each TLS remote node's files.

    ``nodes``: the remote nodes (``store.list_remote_nodes()``). For the metrics/API: each entry's
    ``not_after`` and ``days_left``.
    """
    found: list[CertificateStatus] = []
    tls = settings.tls
    if tls.enabled:
        if tls.certificate is not None:
            found += read_certificates(resolve_path(settings, tls.certificate), "scp certificate", now)
        if tls.ca_certificates is not None:
            found += read_certificates(resolve_path(settings, tls.ca_certificates), "scp trusted CA", now)
    for node in nodes:
        if not node.tls:
            continue
        if node.tls_cert_file:
            found += read_certificates(resolve_path(settings, node.tls_cert_file), f"remote {node.name} client certificate", now)
        if node.tls_ca_file:
            found += read_certificates(resolve_path(settings, node.tls_ca_file), f"remote {node.name} trusted CA", now)
    return found


def log_certificate_expiry(settings: Settings, nodes=()) -> list[CertificateStatus]:
    """At start: one INFO line per certificate, a WARNING for one expiring within the warning period."""
    statuses = certificate_status(settings, nodes)
    for status in statuses:
        warning = status.warning(settings.tls.expiry_warning_days)
        if warning is not None:
            log.warning("TLS: %s", warning)
        else:
            log.info("TLS: %s %s valid until %s (%.0f days)", status.role, status.path, status.not_after, status.days_left)
    for node in nodes:
        if getattr(node, "tls_client_certificate", "optional") == "required" and settings.tls.ca_certificates is None:
            log.warning("TLS: source %s requires a client certificate, but tls.ca_certificates is not set, so the TLS port asks "
                        "for none: every association of %s will be refused", node.name, node.name)  # fmt: skip
    return statuses
