"""Before pynetdicom sees a connection: per-process connection limits and the first PDU, read under a deadline.

- :class:`ConnectionGate` counts connections per process and per host at accept; hosts of
  configured sources (and ``limits.trusted_hosts``) have reserved slots and no per-host limit.
  When a newcomer meets a limit, the gate first sheds the oldest connection that has not yet sent a
  whole A-ASSOCIATE-RQ and that holds a slot the newcomer may use (same host for the per-host limit;
  any host for a configured source's host; hosts that are not sources otherwise), the way HTTP
  servers shed slow-loris clients; only when there is none is the newcomer refused. A connection is
  safe from that once its whole A-ASSOCIATE-RQ has arrived (read, or waiting in the kernel buffer).
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
import os
import socket
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

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


@dataclass(eq=False)
class Ticket:
    """One admitted connection; :meth:`release` (idempotent) frees its slot.

    Until :meth:`associating` it may be evicted by the gate (for a newcomer at a limit): its socket
    is then shut down under it, and :attr:`evicted` says why the handler's read failed.
    """

    gate: ConnectionGate
    host: str
    trusted: bool
    opened: float = field(default_factory=time.monotonic)
    #: A second descriptor of the connection (peek at what waits unread, shut it down on eviction).
    probe: socket.socket | None = None
    #: TLS: the bytes waiting are records, not PDUs (never judged to hold a whole A-ASSOCIATE-RQ).
    tls: bool = False
    #: Bytes of the first PDU the handler has read, and the PDU's whole size once its header was read.
    received: int = 0
    expected: int = 0
    evicted: bool = False
    _released: bool = False

    def release(self) -> None:
        self.gate._release(self)

    def associating(self) -> bool:
        """The whole A-ASSOCIATE-RQ was read: no longer evictable. False if it was evicted first."""
        return self.gate._settle(self)

    def header_read(self, length: int) -> None:
        self.received, self.expected = 6, 6 + length


class ConnectionGate:
    """Per-process connection counts: a total, a per-host limit, slots reserved for trusted hosts;
    at a limit, the oldest connection that has not sent a whole A-ASSOCIATE-RQ makes room."""

    def __init__(self, limits: LimitsSettings) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._total = 0
        self._per_host: dict[str, int] = {}
        #: Admitted connections still before their whole A-ASSOCIATE-RQ, oldest first.
        self._pending: dict[int, Ticket] = {}
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

    def admit(self, host: str, sock: socket.socket | None = None, tls: bool = False) -> Ticket | str:
        """A ticket, or the connection-event kind that says why not.

        At a limit, the oldest pending connection the newcomer may displace is shut down and its slot
        given to the newcomer (see the module docstring); ``sock`` makes this connection displaceable.
        """
        trusted = self.is_trusted(host)
        with self._lock:
            refusal, same_host = self._refusal(host, trusted)
            if refusal:
                victim = self._oldest_displaceable(host if same_host else None, trusted)
                if victim is None:
                    return refusal
                self._evict(victim)
            self._total += 1
            self._per_host[host] = self._per_host.get(host, 0) + 1
            ticket = Ticket(self, host, trusted, tls=tls)
            if sock is not None:
                try:
                    ticket.probe = socket.socket(fileno=os.dup(sock.fileno()))
                except OSError:
                    ticket.probe = None
            self._pending[id(ticket)] = ticket
        return ticket

    def _refusal(self, host: str, trusted: bool) -> tuple[str, bool]:
        """Why a newcomer would be refused now ("" if not), and whether only its own host's slot will do."""
        if self._total >= self.limits.max_connections:
            kind = "refused_total_limit"
        elif not trusted and self._total >= self.limits.max_connections - self.limits.reserved_connections:
            kind = "refused_reserved"
        else:
            kind = ""
        if not trusted and self._per_host.get(host, 0) >= self.limits.max_connections_per_host:
            return kind or "refused_per_host_limit", True
        return kind, False

    def _oldest_displaceable(self, host: str | None, trusted: bool) -> Ticket | None:
        for ticket in self._pending.values():  # oldest first
            if ticket.probe is None:
                continue  # no socket to shut: shedding it would only hide it from the counts
            if host is not None and ticket.host != host:
                continue
            if not trusted and ticket.trusted:
                continue  # a host that is not a source never takes a source's slot
            if not self._whole_rq_arrived(ticket):
                return ticket
        return None

    def _whole_rq_arrived(self, ticket: Ticket) -> bool:
        """True when the connection's whole A-ASSOCIATE-RQ has arrived (part read, the rest waiting)."""
        if ticket.tls or ticket.probe is None:
            return False
        want = (ticket.expected or 6 + self.limits.max_associate_rq_bytes) - ticket.received
        try:
            waiting = ticket.probe.recv(want, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:  # nothing waiting (EAGAIN), or the connection is gone
            return False
        if ticket.expected:
            return ticket.received + len(waiting) >= ticket.expected
        if ticket.received or len(waiting) < 6:
            return False
        pdu_type, _, length = struct.unpack(">BBL", waiting[:6])
        return pdu_type == PDU_ASSOCIATE_RQ and length <= self.limits.max_associate_rq_bytes and len(waiting) >= 6 + length

    def _evict(self, ticket: Ticket) -> None:
        """Under the lock: free the ticket's slot and shut its connection (its handler sees it closed)."""
        ticket.evicted = True
        if ticket.probe is not None:
            try:
                ticket.probe.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._free(ticket)

    def _settle(self, ticket: Ticket) -> bool:
        with self._lock:
            if ticket.evicted:
                return False
            self._pending.pop(id(ticket), None)
            self._close_probe(ticket)
            return True

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            self._free(ticket)

    def _free(self, ticket: Ticket) -> None:
        if ticket._released:
            return
        ticket._released = True
        self._pending.pop(id(ticket), None)
        self._close_probe(ticket)
        self._total -= 1
        left = self._per_host.get(ticket.host, 1) - 1
        if left > 0:
            self._per_host[ticket.host] = left
        else:
            self._per_host.pop(ticket.host, None)

    @staticmethod
    def _close_probe(ticket: Ticket) -> None:
        if ticket.probe is not None:  # our own descriptor: the handler's stays open until it closes it
            ticket.probe.close()
            ticket.probe = None

    @property
    def open_connections(self) -> int:
        with self._lock:
            return self._total

    @property
    def pending_connections(self) -> int:
        with self._lock:
            return len(self._pending)


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


def read_associate_rq(sock: socket.socket, deadline: float, cap: int, ticket: Ticket | None = None) -> tuple[bytes | None, str]:
    """The first PDU if it is a complete, decodable A-ASSOCIATE-RQ of at most ``cap`` bytes.

    Returns ``(pdu, "")`` or ``(None, kind)`` with the connection-event kind; on ``None`` the socket
    has been answered (A-ABORT where the peer sent something) and closed. ``ticket`` is told how
    far the read got (the gate's eviction judges by it; the audit counts the bytes).
    """
    try:
        header = read_exact(sock, 6, deadline)
    except ReadFailed as failed:
        if ticket is not None:
            ticket.received = failed.got
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
    if ticket is not None:
        ticket.header_read(length)
    try:
        body = read_exact(sock, length, deadline)
    except ReadFailed as failed:
        if ticket is not None:
            ticket.received += failed.got
        sock.close()
        return None, "timed_out_before_association" if failed.kind == "timeout" else "closed_mid_pdu"
    if ticket is not None:
        ticket.received += length
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
