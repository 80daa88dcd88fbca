"""Before pynetdicom sees a connection: per-process connection limits and the first PDU, read under a deadline.

- :class:`ConnectionGate` counts connections per process and per host at accept; hosts of
  configured sources (and ``limits.trusted_hosts``) have reserved slots and no per-host limit.
- :func:`read_associate_rq` reads the first PDU in the connection's handler thread against one
  deadline (``limits.establish_timeout_s``) and a size cap checked on the 6-byte header before
  anything else is read; anything but a complete, decodable A-ASSOCIATE-RQ is answered with A-ABORT
  (where the peer sent something) and closed. It reports the connection-event kind for the
  aggregated audit (:data:`dicom_node.audit.trail.CONNECTION_KINDS`).

Plain sockets and bytes; the only pynetdicom use is its A-ASSOCIATE-RQ decoder (and quieting the
log records it writes for each bad value, which an attacker could otherwise multiply).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from pynetdicom.pdu import A_ASSOCIATE_RQ

from dicom_node.settings import LimitsSettings

log = logging.getLogger(__name__)

PDU_ASSOCIATE_RQ = 0x01
PDU_P_DATA_TF = 0x04
#: A-ABORT reasons (PS3.8 9.3.8): source 0x02 = service provider.
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PARAMETER = 0x06


def a_abort_pdu(reason: int) -> bytes:
    """An A-ABORT PDU from the service provider with ``reason``."""
    return struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, reason)


# ---- connection limits ------------------------------------------------------------------------------


@dataclass
class Ticket:
    """One admitted connection; :meth:`release` (idempotent) frees its slot."""

    gate: ConnectionGate
    host: str
    trusted: bool
    _released: bool = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.gate._release(self)


class ConnectionGate:
    """Per-process connection counts: a total, a per-host limit, slots reserved for trusted hosts."""

    def __init__(self, limits: LimitsSettings) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._total = 0
        self._per_host: dict[str, int] = {}
        self._trusted_ips: frozenset[str] = frozenset()
        self._trusted_networks = tuple(ipaddress.ip_network(entry, strict=False) for entry in limits.trusted_hosts)

    def set_trusted_ips(self, ips: Iterable[str]) -> None:
        self._trusted_ips = frozenset(ips)

    def is_trusted(self, host: str) -> bool:
        if host in self._trusted_ips:
            return True
        if not self._trusted_networks:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self._trusted_networks)

    def admit(self, host: str) -> Ticket | str:
        """A ticket, or the connection-event kind that says why not."""
        trusted = self.is_trusted(host)
        with self._lock:
            if self._total >= self.limits.max_connections:
                return "refused_total_limit"
            if not trusted:
                if self._total >= self.limits.max_connections - self.limits.reserved_connections:
                    return "refused_reserved"
                if self._per_host.get(host, 0) >= self.limits.max_connections_per_host:
                    return "refused_per_host_limit"
            self._total += 1
            self._per_host[host] = self._per_host.get(host, 0) + 1
        return Ticket(self, host, trusted)

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            self._total -= 1
            left = self._per_host.get(ticket.host, 1) - 1
            if left > 0:
                self._per_host[ticket.host] = left
            else:
                self._per_host.pop(ticket.host, None)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return self._total


# ---- reading exactly, against a deadline ------------------------------------------------------------


class ReadFailed(Exception):
    """``kind``: ``"closed"`` (EOF) or ``"timeout"``; ``got``: bytes read before it happened."""

    def __init__(self, kind: str, got: int) -> None:
        super().__init__(kind)
        self.kind = kind
        self.got = got


def read_exact(sock: socket.socket, size: int, deadline: float) -> bytearray:
    """Exactly ``size`` bytes, or ReadFailed; never waits past ``deadline`` (time.monotonic)."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ReadFailed("timeout", got)
        try:
            sock.settimeout(remaining)
            count = sock.recv_into(view[got:], min(size - got, 1 << 20))
        except TimeoutError:
            raise ReadFailed("timeout", got) from None
        except OSError:
            raise ReadFailed("closed", got) from None
        if count == 0:
            raise ReadFailed("closed", got)
        got += count
    return buffer


def send_abort_and_close(sock: socket.socket, reason: int) -> None:
    """A-ABORT to the peer (best effort), then close without reading anything more."""
    try:
        sock.settimeout(1.0)
        sock.sendall(a_abort_pdu(reason))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def read_associate_rq(sock: socket.socket, deadline: float, cap: int) -> tuple[bytes | None, str]:
    """The first PDU if it is a complete, decodable A-ASSOCIATE-RQ of at most ``cap`` bytes.

    Returns ``(pdu, "")`` or ``(None, kind)`` with the connection-event kind; on ``None`` the socket
    has been answered (A-ABORT where the peer sent something) and closed.
    """
    try:
        header = read_exact(sock, 6, deadline)
    except ReadFailed as failed:
        sock.close()
        if failed.kind == "timeout":
            return None, "timed_out_before_association"
        return None, "closed_before_association" if failed.got == 0 else "closed_mid_pdu"
    pdu_type, _, length = struct.unpack(">BBL", header)
    if pdu_type != PDU_ASSOCIATE_RQ:
        send_abort_and_close(sock, ABORT_UNEXPECTED_PDU if 0x01 <= pdu_type <= 0x07 else ABORT_UNRECOGNIZED_PDU)
        return None, "invalid_pdu"
    if length > cap:
        send_abort_and_close(sock, ABORT_INVALID_PARAMETER)
        return None, "oversize_pdu"
    try:
        body = read_exact(sock, length, deadline)
    except ReadFailed as failed:
        sock.close()
        return None, "timed_out_before_association" if failed.kind == "timeout" else "closed_mid_pdu"
    pdu = bytes(header + body)
    try:
        with _quiet_pynetdicom():  # it logs each bad value before raising: one aggregated line instead
            A_ASSOCIATE_RQ().decode(pdu)
    except Exception:  # any decoding failure of peer bytes: pynetdicom raises assorted types
        send_abort_and_close(sock, ABORT_INVALID_PARAMETER)
        return None, "invalid_pdu"
    return pdu, ""


_quiet = threading.local()
#: pynetdicom loggers that report a bad value in a PDU being decoded.
_DECODE_LOGGERS = ("pynetdicom.utils", "pynetdicom.pdu", "pynetdicom.pdu_items", "pynetdicom.pdu_primitives")


class _QuietWhileDecoding(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_quiet, "on", False)


_QUIET_FILTER = _QuietWhileDecoding()


@contextlib.contextmanager
def _quiet_pynetdicom():
    """Drop pynetdicom's decode-error records in this thread while decoding a peer's first PDU."""
    for name in _DECODE_LOGGERS:
        logger = logging.getLogger(name)
        if _QUIET_FILTER not in logger.filters:
            logger.addFilter(_QUIET_FILTER)
    _quiet.on = True
    try:
        yield
    finally:
        _quiet.on = False
