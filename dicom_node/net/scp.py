"""The DICOM SCP: C-ECHO and C-STORE, who may connect, and the durable store handler.

One :class:`StorageScp` per process. Its handlers are bound to a pynetdicom AE built by
:func:`build_ae`; each association runs in its own pynetdicom thread, and the state store hands
every thread its own connection.

Acceptance (EVT_REQUESTED, before any negotiation):

- called AE title must be ours, else A-ASSOCIATE-RJ permanent / service-user / 0x07
  "called AE title not recognised";
- calling AE (and host, when the source has one) must be a configured source
  (``store.find_source``), else permanent / service-user / 0x03 "calling AE title not
  recognised", unless ``node.accept_unknown_sources``;
- a matched source with ``tls_client_certificate = required`` must have presented a trusted client
  certificate (TLS port), else permanent / service-user / 0x03, audited and logged with the reason;
- state store unreachable: transient / service-user / no reason given (the sender retries);
- a source's host name not resolved yet (``SourceHostPending``: names are resolved off the accept
  path, :mod:`dicom_node.store.hosts`): transient as well.

"Accepted" is logged and audited when pynetdicom has really accepted (EVT_ACCEPTED); an association
pynetdicom itself rejects after our checks (its slot limit) is audited as rejected with that reason
and its session dropped (EVT_REJECTED). Rejections are recorded one by one up to
``limits.audit_rejections_per_host`` per host and window, then summarised (:class:`AggregatedAudit`);
AE titles are escaped before they reach a row or a log line. What happens before an A-ASSOCIATE-RQ
is complete is :mod:`dicom_node.net.guard`'s.

C-STORE: parse the header only, write the bytes as received (File Meta + data set) durably into
the spool, record the instance, and only then answer Success. See :meth:`StorageScp.handle_store`;
the rules after the header check are :mod:`dicom_node.net.intake`'s, shared with STOW-RS.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from dicom_node.audit import trail as audit
from dicom_node.audit.trail import AggregatedAudit, AuditTrail, Peer, printable
from dicom_node.net.dataset import STATUS_PROCESSING_FAILURE, STATUS_SUCCESS, InstanceHeader, MalformedDataset, parse_instance_header
from dicom_node.net.intake import InstanceIntake, Sender
from dicom_node.net.negotiation import accept_unlisted_storage_classes
from dicom_node.net.part10 import part10_header
from dicom_node.net.tls import client_certificate_refusal
from dicom_node.net.transfer_syntaxes import accepted_transfer_syntaxes
from dicom_node.settings import Settings
from dicom_node.store.base import RemoteNode, SourceHostPending, Store, StoreError
from dicom_node.store.spool import SpooledFile, ensure_spooled, write_instance

log = logging.getLogger(__name__)

#: A-ASSOCIATE-RJ (result, source, diagnostic) triples (PS3.8 9.3.4).
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_TRANSIENT = (0x02, 0x01, 0x01)
#: What pynetdicom's own rejections mean, for the audit (result, source, diagnostic) -> reason.
PYNETDICOM_REJECT_REASONS = {
    (0x02, 0x03, 0x02): "local limit exceeded: the SCP process's association slots are all in use",
}


#: Called when a source with ``complete_on_release`` releases: (study UIDs received in the association).
ReleaseCallback = Callable[[RemoteNode, set[str]], None]


@dataclass
class AssociationSession:
    """What one association did, for its audit summary and for complete-on-release."""

    peer: Peer
    source: RemoteNode | None
    started: float = field(default_factory=time.monotonic)
    received: int = 0
    duplicates: int = 0
    new_versions: int = 0
    rejected: int = 0
    failed_resources: int = 0
    bytes_received: int = 0
    study_uids: set[str] = field(default_factory=set)


def failure_status(status: int, comment: str) -> Dataset:
    """A C-STORE response status with an Error Comment (LO, at most 64 characters)."""
    response = Dataset()
    response.Status = status
    response.ErrorComment = comment[:64]
    return response


@dataclass(frozen=True)
class _BytesWriter:
    """A C-STORE data set (in memory, with the Part 10 header we made) into the spool."""

    spool_dir: Path
    header: InstanceHeader
    parts: list[bytes]

    def write(self) -> SpooledFile:
        return write_instance(self.spool_dir, self.header.study_instance_uid, self.header.sop_instance_uid, self.parts)

    def rewrite(self, spooled: SpooledFile) -> None:
        ensure_spooled(self.spool_dir, spooled, self.header.study_instance_uid, self.header.sop_instance_uid, self.parts)


class StorageScp:
    """Event handlers of the node's SCP (one instance per process)."""

    def __init__(self, settings: Settings, store: Store, audit_trail: AuditTrail, on_release: ReleaseCallback | None = None) -> None:
        self.settings = settings
        self.store = store
        self.audit = audit_trail
        self.on_release = on_release
        self.spool_dir: Path = settings.storage.spool_dir
        self.intake = InstanceIntake(settings, store, audit_trail)
        self._sessions: dict[int, AssociationSession] = {}
        self._sessions_lock = threading.Lock()
        limits = settings.limits
        self.aggregate = AggregatedAudit(
            audit_trail, limits.audit_window_s, limits.audit_rejections_per_host, limits.audit_hosts_per_window, limits.audit_host_threshold
        )

    # ---- wiring -------------------------------------------------------------------------------
    def event_handlers(self) -> list[tuple]:
        return [
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_ACCEPTED, self.handle_accepted),
            (evt.EVT_REJECTED, self.handle_rejected),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_RELEASED, self.handle_released),
            (evt.EVT_ABORTED, self.handle_aborted),
        ]

    def _session(self, assoc: Association) -> AssociationSession | None:
        with self._sessions_lock:
            return self._sessions.get(id(assoc))

    def _pop_session(self, assoc: Association) -> AssociationSession | None:
        with self._sessions_lock:
            return self._sessions.pop(id(assoc), None)

    # ---- association acceptance ---------------------------------------------------------------
    def handle_requested(self, event: evt.Event) -> None:
        """Accept or reject the A-ASSOCIATE-RQ by called/calling AE title and host."""
        assoc = event.assoc
        request = assoc.requestor.primitive
        calling_ae = str(request.calling_ae_title).strip()
        called_ae = str(request.called_ae_title).strip()
        host = assoc.requestor.address
        # Escaped: the peer chose these strings, and they go into rows and log lines.
        peer = Peer(calling_ae=printable(calling_ae, 16), called_ae=printable(called_ae, 16), host=host)
        if called_ae != self.settings.node.ae_title:
            self._reject(assoc, peer, REJECT_CALLED_AE, f"called AE title '{peer.called_ae}' is not ours ({self.settings.node.ae_title!r})")
            return
        try:
            source = self.store.find_source(calling_ae, host)
        except SourceHostPending as exc:  # never resolve DNS while the sender waits: it retries shortly
            log.warning("association from %s@%s refused (transient): %s", peer.calling_ae, host, exc)
            self._reject(assoc, peer, REJECT_TRANSIENT, str(exc))
            return
        except StoreError as exc:
            log.error("association from %s@%s refused (transient): state store unavailable: %s", peer.calling_ae, host, exc)
            self._reject(assoc, peer, REJECT_TRANSIENT, "state store unavailable", audit_it=False)
            return
        if source is None and not self.settings.node.accept_unknown_sources:
            self._reject(
                assoc,
                peer,
                REJECT_CALLING_AE,
                f"calling AE title '{peer.calling_ae}' from {host} is not a configured source "
                "(add it with `anatomix-node ae add NAME --ae-title T --host H --port P --role source`)",
            )
            return
        if source is not None and (refusal := client_certificate_refusal(source, assoc)) is not None:
            self._reject(assoc, peer, REJECT_CALLING_AE, refusal)
            return
        with self._sessions_lock:
            # Not yet "accepted": pynetdicom may still reject it (slot limit); see handle_accepted/rejected.
            self._sessions[id(assoc)] = AssociationSession(peer=peer, source=source)

    def handle_accepted(self, event: evt.Event) -> None:
        session = self._session(event.assoc)
        if session is None:
            return
        source = session.source
        log.info(
            "association accepted from %s@%s (source %s)",
            session.peer.calling_ae,
            session.peer.host,
            source.name if source else "unknown, accepted by accept_unknown_sources",
        )
        self.audit.record(audit.ASSOCIATION_ACCEPTED, session.peer, source=source.name if source else None)

    def handle_rejected(self, event: evt.Event) -> None:
        """pynetdicom rejected an association our checks had let through: audit it so, free its session."""
        session = self._pop_session(event.assoc)
        if session is None:
            return  # one of ours (_reject), already recorded
        primitive = event.assoc.acceptor.primitive
        rsd = (getattr(primitive, "result", None), getattr(primitive, "result_source", None), getattr(primitive, "diagnostic", None))
        reason = PYNETDICOM_REJECT_REASONS.get(rsd, f"rejected by pynetdicom's negotiation (result/source/diagnostic {rsd})")
        if rsd == (0x02, 0x03, 0x02):
            reason += f" ({self.settings.limits.max_connections} per process)"
        self._record_rejection(session.peer, rsd, reason)

    def _record_rejection(self, peer: Peer, rsd: tuple, reason: str) -> None:
        """Log and audit one rejection, unless this host is over its per-window quota (then it is counted)."""
        if not self.aggregate.allow_rejection(peer.host or "", peer.calling_ae):
            return
        log.warning("association from %s@%s to '%s' rejected: %s", peer.calling_ae, peer.host, peer.called_ae, reason)
        self.audit.record(audit.ASSOCIATION_REJECTED, peer, result=rsd[0], source=rsd[1], diagnostic=rsd[2], reason=reason)

    def _reject(self, assoc: Association, peer: Peer, rsd: tuple[int, int, int], reason: str, audit_it: bool = True) -> None:
        if audit_it:  # recorded before the peer hears of it, so the trail never lags the wire
            self._record_rejection(peer, rsd, reason)
        else:
            log.warning("association from %s@%s to '%s' rejected: %s", peer.calling_ae, peer.host, peer.called_ae, reason)
        assoc.acse.send_reject(*rsd)
        # The A-ASSOCIATE-RJ is queued to the DUL thread; let it leave (the DUL moves on from Sta3,
        # "awaiting local response", or from Sta2 if it has not yet noted the request it handed us)
        # before pynetdicom closes the socket; at most 2 s (a busy process can take that long).
        deadline = time.monotonic() + 2.0
        while assoc.dul.state_machine.current_state in ("Sta2", "Sta3") and time.monotonic() < deadline:
            time.sleep(0.002)

    # ---- DIMSE services -----------------------------------------------------------------------
    def handle_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def handle_store(self, event: evt.Event) -> int | Dataset:
        """Spool the instance durably, record it, then answer; never acknowledge what could be lost."""
        session = self._session(event.assoc)
        peer = session.peer if session else Peer(None, None, event.assoc.requestor.address)
        request = event.request
        sop_instance_uid = str(request.AffectedSOPInstanceUID)
        try:
            return self._store_instance(event, session, peer)
        except Exception as exc:  # handler boundary: answer a failure status, log, audit, keep serving
            log.exception("C-STORE of %s from %s failed unexpectedly (%s)", sop_instance_uid, peer.calling_ae, type(exc).__name__)
            self.audit.record(audit.INSTANCE_REJECTED, peer, sop_instance_uid=sop_instance_uid, status=STATUS_PROCESSING_FAILURE, reason=type(exc).__name__)
            return failure_status(STATUS_PROCESSING_FAILURE, f"internal error: {type(exc).__name__}")

    def _store_instance(self, event: evt.Event, session: AssociationSession | None, peer: Peer) -> int | Dataset:
        request = event.request
        transfer_syntax = UID(event.context.transfer_syntax)
        dataset_bytes = event.encoded_dataset(include_meta=False)
        sender = Sender(peer, session.source if session else None, "C-STORE")
        try:
            header = parse_instance_header(dataset_bytes, transfer_syntax, str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID))
        except MalformedDataset as exc:
            if session:
                session.rejected += 1
            self.intake.refuse(sender, str(request.AffectedSOPInstanceUID), exc.status, exc.reason)
            return failure_status(exc.status, exc.reason)

        file_meta = part10_header(header.sop_class_uid, header.sop_instance_uid, str(transfer_syntax))
        writer = _BytesWriter(self.spool_dir, header, [file_meta, dataset_bytes])
        admission = self.intake.admit(sender, header, str(transfer_syntax), len(file_meta) + len(dataset_bytes), writer)
        if not admission.stored:
            if session:
                session.failed_resources += 1
            return failure_status(admission.status, admission.reason)
        if session:
            session.bytes_received += admission.size
            session.study_uids.add(header.study_instance_uid)
            if admission.outcome == "duplicate":
                session.duplicates += 1
            else:
                session.received += 1
            if admission.outcome == "new_version":
                session.new_versions += 1
        return STATUS_SUCCESS

    # ---- association end ----------------------------------------------------------------------
    def handle_released(self, event: evt.Event) -> None:
        session = self._pop_session(event.assoc)
        if session is None:
            return
        self._summarise(session, audit.ASSOCIATION_RELEASED)
        if session.source is not None and session.source.complete_on_release and session.study_uids and self.on_release:
            try:
                self.on_release(session.source, set(session.study_uids))
            except StoreError as exc:
                # The quiet period closes these studies later; nothing is lost.
                log.error("closing studies at release of %s failed: %s", session.peer.calling_ae, exc)

    def handle_aborted(self, event: evt.Event) -> None:
        session = self._pop_session(event.assoc)
        if session is not None:
            # Why the guard closed it (oversize PDU, stalled mid-PDU), or pynetdicom's idle timeout.
            reason = getattr(event.assoc.dul.socket, "refusal", "") or None
            if reason is None and event.assoc.dul.idle_timer_expired():
                reason = f"network timeout: nothing complete received for {event.assoc.network_timeout} s"
            self._summarise(session, audit.ASSOCIATION_ABORTED, reason=reason)

    def _summarise(self, session: AssociationSession, event_name: str, reason: str | None = None) -> None:
        seconds = time.monotonic() - session.started
        log.info(
            "association from %s@%s ended (%s): %d stored, %d duplicate, %d new version, %d refused, %d out-of-resources, %.1f MB in %.1f s",
            session.peer.calling_ae,
            session.peer.host,
            event_name.removeprefix("association_"),
            session.received,
            session.duplicates,
            session.new_versions,
            session.rejected,
            session.failed_resources,
            session.bytes_received / 1e6,
            seconds,
        )
        extra = {"reason": reason} if reason else {}
        if reason:
            log.warning("association from %s@%s aborted by the node: %s", session.peer.calling_ae, session.peer.host, reason)
        self.audit.record(
            event_name,
            session.peer,
            received=session.received,
            duplicates=session.duplicates,
            new_versions=session.new_versions,
            refused=session.rejected,
            out_of_resources=session.failed_resources,
            bytes=session.bytes_received,
            seconds=round(seconds, 3),
            studies=sorted(session.study_uids),
            **extra,
        )


def build_ae(settings: Settings) -> AE:
    """An AE that accepts Verification and every storage SOP class in every decodable syntax.

    Private and newer-than-pynetdicom storage classes are accepted too once the process has
    installed :func:`dicom_node.net.negotiation.accept_unlisted_storage_classes` (process-wide: the
    serve entry point does it, :func:`accept_unlisted_classes_in_this_process`); building an AE never does.
    """
    ae = AE(ae_title=settings.node.ae_title)
    transfer_syntaxes = accepted_transfer_syntaxes()
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, transfer_syntaxes)
    ae.add_supported_context(Verification)
    ae.maximum_pdu_size = settings.node.max_pdu
    ae.network_timeout = settings.node.network_timeout_s
    ae.acse_timeout = settings.node.network_timeout_s
    ae.dimse_timeout = settings.node.network_timeout_s
    # pynetdicom's slot limit: our connection gate (limits.max_connections, with reserved slots and a
    # per-host limit) admits at most this many, so pynetdicom's own transient rejection stays a backstop.
    ae.maximum_associations = settings.limits.max_connections
    return ae


def accept_unlisted_classes_in_this_process() -> bool:
    """Private and newer-than-pynetdicom storage classes: stored, never analysed (a whole-study push
    must not fail on a vendor's private object). Process-wide, so called once by the process that
    serves (an SCP process of ``serve``), never by :func:`build_ae`. Idempotent."""
    return accept_unlisted_storage_classes(accepted_transfer_syntaxes())
