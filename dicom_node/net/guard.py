"""What an unidentified client may cost the DICOM port: slots, deadlines and size caps, before pynetdicom.

pynetdicom's acceptor, left alone, gives every TCP connection an association slot, two threads and
an unbounded read from the first byte (an A-ASSOCIATE-RQ may declare 4 GiB and is buffered whole,
a P-DATA-TF is read whatever the negotiated maximum, a stalled socket blocks its reader forever,
and a connection closed before its first PDU holds its slot for the ACSE timeout). So:

- :mod:`dicom_node.net.gate` admits the connection (connection limits) and reads its first PDU
  under the establishment deadline and the size cap. Only a complete, decodable A-ASSOCIATE-RQ
  creates a pynetdicom association (and takes one of its slots); everything else is closed and
  counted for the aggregated audit.
- :class:`GuardedSocket` replays that PDU to pynetdicom, then enforces on every later PDU: the
  negotiated maximum for P-DATA-TF, the A-ASSOCIATE-RQ cap for the rest, ``limits.max_message_bytes``
  per DIMSE message, and ``node.network_timeout_s`` for a PDU to arrive once begun. A breach is
  answered with A-ABORT (service provider, invalid PDU parameter value) and the connection closed.
- Idle cost: pynetdicom's DUL and association loops sleep 1 ms per turn (about 1000 wake-ups a
  second per loop). The DUL here waits in ``select`` on the socket and an eventfd that is written
  when the association queues something to send; the association reactor waits on an event set
  when a message or an ACSE primitive arrives. Both wake at once for work and at least every
  ``limits.idle_poll_s`` for timers.

Reliance on pynetdicom internals (made for pynetdicom 3.0.x; ``tests/faults/test_port_hostile.py``
and ``tests/dicom_node/test_port_limits.py`` fail if they move): ``RequestHandler._create_association``
and the attributes it sets, ``AssociationSocket.ready/recv`` as the DUL calls them (``recv(6)``
then ``recv(length)``), ``DULServiceProvider.to_provider_queue/to_user_queue``,
``DIMSEServiceProvider.msg_queue`` and ``Association._reactor_checkpoint``.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.transport import AddressInformation, AssociationSocket, RequestHandler

from dicom_node.audit.trail import AggregatedAudit
from dicom_node.net.gate import (
    ABORT_INVALID_PARAMETER,
    ABORT_UNRECOGNIZED_PDU,
    PDU_P_DATA_TF,
    ConnectionGate,
    ReadFailed,
    Ticket,
    a_abort_pdu,
    read_associate_rq,
    read_exact,
)
from dicom_node.settings import LimitsSettings

log = logging.getLogger(__name__)

# ---- the socket pynetdicom reads through ------------------------------------------------------------


class GuardedSocket(AssociationSocket):
    """pynetdicom's AssociationSocket with the first PDU pre-read, per-PDU caps and a blocking wait."""

    def __init__(self, assoc: Association, client_socket: socket.socket, first_pdu: bytes, limits: LimitsSettings, wake_fd: int) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self._prebuffer = bytearray(first_pdu)
        self._limits = limits
        self._wake_fd = wake_fd
        self._body: tuple[int, int] | None = None  # (pdu type, length) once a header was read
        self._message_bytes = [0, 0]  # data set, command fragments of the current DIMSE messages
        #: Why we closed the connection (for the association's audit row), or "".
        self.refusal = ""

    def _timeout(self) -> float:
        return float(self.assoc.network_timeout or 60.0)

    def _read(self, size: int) -> bytearray:
        """Exactly ``size`` bytes within the network timeout (ReadFailed otherwise); sends keep that timeout."""
        assert self.socket is not None
        try:
            return read_exact(self.socket, size, time.monotonic() + self._timeout())
        finally:
            try:
                self.socket.settimeout(self._timeout())
            except OSError:
                pass

    @property
    def ready(self) -> bool:
        """True when a PDU can be read; waits up to ``idle_poll_s`` (woken at once by queued sends)."""
        if self._prebuffer:
            return True
        sock = self.socket
        if sock is None or not self._is_connected:
            return False
        pending = getattr(sock, "pending", None)  # TLS: decrypted bytes select() cannot see
        if pending is not None and pending():
            return True
        try:
            readable, _, _ = select.select([sock, self._wake_fd], [], [], self._limits.idle_poll_s)
        except (OSError, ValueError):
            self.event_queue.put("Evt17")
            return False
        if self._wake_fd in readable:
            try:
                os.eventfd_read(self._wake_fd)
            except (BlockingIOError, OSError):
                pass
        return sock in readable

    def recv(self, nr_bytes: int) -> bytearray:
        if self._prebuffer:
            chunk = self._prebuffer[:nr_bytes]
            del self._prebuffer[:nr_bytes]
            return chunk
        if self.socket is None:
            return bytearray()
        if self._body is None:
            return self._recv_header(nr_bytes)
        return self._recv_body(nr_bytes)

    def _recv_header(self, nr_bytes: int) -> bytearray:
        try:
            header = self._read(nr_bytes)
        except ReadFailed as failed:
            if failed.kind == "timeout":
                self._refuse(f"stalled for {self.assoc.network_timeout} s inside a PDU header", None)
            return bytearray()
        pdu_type, _, length = struct.unpack(">BBL", header)
        if not 0x01 <= pdu_type <= 0x07:
            self._refuse(f"unrecognised PDU type 0x{pdu_type:02X}", ABORT_UNRECOGNIZED_PDU)
            return bytearray()
        if pdu_type == PDU_P_DATA_TF:
            cap = self.assoc.acceptor.maximum_length or self._limits.max_message_bytes
            what = "negotiated maximum" if self.assoc.acceptor.maximum_length else "message size cap"
        else:
            cap, what = self._limits.max_associate_rq_bytes, "PDU size cap"
        if length > cap:
            self._refuse(f"PDU type 0x{pdu_type:02X} of {length} bytes over the {what} ({cap} bytes)", ABORT_INVALID_PARAMETER)
            return bytearray()
        self._body = (pdu_type, length)
        return header

    def _recv_body(self, nr_bytes: int) -> bytearray:
        assert self._body is not None
        pdu_type, _ = self._body
        self._body = None
        try:
            body = self._read(nr_bytes)
        except ReadFailed as failed:
            if failed.kind == "timeout":
                self._refuse(f"stalled for {self.assoc.network_timeout} s inside a PDU ({failed.got} of {nr_bytes} bytes)", None)
            return bytearray()
        if pdu_type == PDU_P_DATA_TF and not self._count_message_bytes(body):
            return bytearray()
        return body

    def _count_message_bytes(self, body: bytearray) -> bool:
        """Add the PDVs to their message's running size; False (and aborted) past ``max_message_bytes``."""
        offset = 0
        while offset + 6 <= len(body):
            item_length = int.from_bytes(body[offset : offset + 4], "big")
            control = body[offset + 5]
            if item_length < 2:
                return True  # malformed: pynetdicom's decoder rejects it
            kind = control & 0x01
            self._message_bytes[kind] += item_length - 2
            if self._message_bytes[kind] > self._limits.max_message_bytes:
                self._refuse(f"DIMSE message over the size cap ({self._limits.max_message_bytes} bytes)", ABORT_INVALID_PARAMETER)
                return False
            if control & 0x02:
                self._message_bytes[kind] = 0
            offset += 4 + item_length
        return True

    def _refuse(self, reason: str, abort_reason: int | None) -> None:
        """Record why, A-ABORT the peer (unless it is gone) and shut the connection; pynetdicom sees it closed."""
        self.refusal = reason
        sock = self.socket
        if sock is None:
            return
        try:
            if abort_reason is not None:
                sock.settimeout(1.0)
                sock.sendall(a_abort_pdu(abort_reason))
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


# ---- waking pynetdicom's loops for work instead of polling ------------------------------------------


class NotifyingQueue(queue.Queue):
    """A queue that calls ``notify`` after every put."""

    def __init__(self, notify: Callable[[], None]) -> None:
        super().__init__()
        self._notify = notify

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


class IdleCheckpoint:
    """Stands in for ``Association._reactor_checkpoint``: the reactor's per-turn wait also waits for work.

    The work wait comes first, then the real checkpoint, so a pause requested meanwhile (clear())
    is still honoured before the reactor touches its queues.
    """

    def __init__(self, checkpoint: threading.Event, activity: threading.Event, idle_s: float) -> None:
        self._checkpoint = checkpoint
        self._activity = activity
        self._idle_s = idle_s

    def set(self) -> None:
        self._checkpoint.set()
        self._activity.set()

    def clear(self) -> None:
        self._checkpoint.clear()

    def is_set(self) -> bool:
        return self._checkpoint.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        self._activity.wait(self._idle_s)
        self._activity.clear()  # before the reactor looks at its queues: a later put sets it again
        return self._checkpoint.wait(timeout)


class GuardedAssociation(Association):
    """An acceptor association that frees its connection slot and wake-up fd when its thread ends."""

    ticket: Ticket | None = None
    on_end: Callable[[], None] | None = None

    def run(self) -> None:
        try:
            super().run()
        finally:
            if self.on_end is not None:
                self.on_end()
            if self.ticket is not None:
                self.ticket.release()


def make_wakeful(assoc: Association, idle_s: float) -> int:
    """Replace the association's polling waits by wake-ups; returns the DUL's eventfd (caller closes it)."""
    wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    activity = threading.Event()

    def wake_dul() -> None:
        try:
            os.eventfd_write(wake_fd, 1)
        except OSError:
            pass  # closed after the association ended

    assoc.dul.to_provider_queue = NotifyingQueue(wake_dul)
    assoc.dul.to_user_queue = NotifyingQueue(activity.set)
    assoc.dimse.msg_queue = NotifyingQueue(activity.set)
    assoc._reactor_checkpoint = IdleCheckpoint(assoc._reactor_checkpoint, activity, idle_s)
    return wake_fd


# ---- the request handler -----------------------------------------------------------------------------


@dataclass
class PortGuard:
    """What the guarded server needs: limits, the gate, the aggregated audit."""

    limits: LimitsSettings
    aggregate: AggregatedAudit
    gate: ConnectionGate = field(init=False)
    _tickets: dict[int, Ticket] = field(default_factory=dict, init=False, repr=False)
    _tickets_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.gate = ConnectionGate(self.limits)

    def admit(self, request: socket.socket, host: str, tls: bool = False) -> bool:
        outcome = self.gate.admit(host, request, tls=tls)
        if isinstance(outcome, str):
            self.aggregate.note_connection(host, outcome)
            return False
        with self._tickets_lock:
            self._tickets[id(request)] = outcome
        return True

    def take_ticket(self, request: socket.socket) -> Ticket | None:
        with self._tickets_lock:
            return self._tickets.pop(id(request), None)


class GuardedRequestHandler(RequestHandler):
    """Reads the A-ASSOCIATE-RQ under the guard's deadline and cap, then hands over to pynetdicom."""

    def handle(self) -> None:
        guard: PortGuard = self.server.guard  # type: ignore[attr-defined]
        ticket = guard.take_ticket(self.request)
        host = str(self.client_address[0])
        handed_over = False

        def failed(kind: str) -> None:
            """Count a connection that never became an association (with what it held and sent)."""
            held_s, received = 0.0, 0
            if ticket is not None:
                held_s, received = time.monotonic() - ticket.opened, ticket.received
                if ticket.evicted:
                    kind = "evicted_before_association"
            guard.aggregate.note_connection(host, kind, held_s=held_s, received=received)

        try:
            deadline = time.monotonic() + guard.limits.establish_timeout_s
            tls_context = getattr(self.server, "tls_context", None)
            if tls_context is not None:  # here, in this connection's thread, under the same deadline
                from dicom_node.net.tls import handshake

                tls_socket, kind = handshake(self.request, tls_context, deadline)
                if tls_socket is None:
                    failed(kind)
                    return
                self.request = tls_socket
            first_pdu, kind = read_associate_rq(self.request, deadline, guard.limits.max_associate_rq_bytes, ticket)
            if first_pdu is None:
                failed(kind)
                return
            if ticket is not None and not ticket.associating():
                failed("evicted_before_association")  # shed a moment before its last byte was read
                return
            # Sends block at most the network timeout (a peer that stops reading is cut off).
            self.request.settimeout(float(self.ae.network_timeout or 60.0))
            assoc = self._create_guarded_association(first_pdu, guard.limits)
            assoc.ticket = ticket
            from pynetdicom import evt

            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            handed_over = True
        finally:
            if not handed_over:
                if ticket is not None:
                    ticket.release()
                try:
                    self.request.close()
                except OSError:
                    pass

    def _create_guarded_association(self, first_pdu: bytes, limits: LimitsSettings) -> GuardedAssociation:
        """An acceptor Association configured as pynetdicom's handler does, on a GuardedSocket."""
        ae = self.ae
        assoc = GuardedAssociation(ae, MODE_ACCEPTOR)
        assoc._server = self.server
        # "AcceptorThread" in the name is how pynetdicom counts the AE's active associations.
        assoc.name = f"AcceptorThread@{time.strftime('%Y%m%d%H%M%S')}"
        wake_fd = make_wakeful(assoc, limits.idle_poll_s)
        sock = GuardedSocket(assoc, self.request, first_pdu, limits, wake_fd)
        closer = weakref.finalize(sock, _close_fd, wake_fd)

        def on_end() -> None:
            assoc.dul.join(timeout=5.0)
            if not assoc.dul.is_alive():
                closer()

        assoc.on_end = on_end
        assoc.set_socket(sock)
        assoc.acceptor.maximum_length = ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = AddressInformation.from_tuple(self.server.server_address)
        assoc.acceptor.implementation_class_uid = ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)  # negotiation mutates them
        assoc.requestor.address_info = AddressInformation.from_tuple(self.client_address)
        for event, handlers in self.server._handlers.items():
            if event.is_intervention:
                if handlers:
                    assoc.bind(event, *handlers)
            else:
                for handler, args in handlers:
                    assoc.bind(event, handler, args)
        return assoc


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
