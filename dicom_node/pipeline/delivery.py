"""Deliver result instances to destinations: C-STORE SCU, status taxonomy, retry policy, fallback.

One association per destination carries every pending object of a study version, SR and SEG before
the objects that reference them. Each instance's outcome is one of:

* ``sent``: DIMSE status 0x0000 or any warning (pynetdicom's status categories: 0x0001, 0x0107,
  0x0116, 0xBxxx: the peer stored the object);
* transient: no association (connection refused, timeout, A-ASSOCIATE-RJ *transient*), an abort,
  no response, or 0xA7xx (out of resources): retried with exponential backoff and jitter until
  ``delivery.max_attempts``, then dead-lettered (``dead``) with the last reason;
* permanent: 0xA9xx (data set does not match SOP class), 0xCxxx (cannot understand), A-ASSOCIATE-RJ
  *permanent* (our AE title refused), any other failure: recorded as ``failed`` and not retried blindly;
  an admin re-sends by hand (``anatomix-node resend``).

Comprehensive 3D SR (88.34) the destination does not support (no accepted presentation context, or
status 0x0122) is sent again as Comprehensive SR (88.33) with the same content and UID.

A DICOMweb destination (a remote node with a ``url``) gets the same objects in the same order by
STOW-RS instead (:mod:`dicom_node.pipeline.delivery_dicomweb`); its answers map onto the same
outcomes, so retries, dead letters and destination health are the same for both.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage as COMPREHENSIVE_3D_SR
from pydicom.uid import ComprehensiveSRStorage as COMPREHENSIVE_SR
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.uid import SecondaryCaptureImageStorage as SECONDARY_CAPTURE
from pydicom.uid import SegmentationStorage as SEGMENTATION_STORAGE
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context

from dicom_node.audit import trail as audit
from dicom_node.pipeline.delivery_outcomes import Outcome, OutgoingObject, StoreOutcome, classify_status
from dicom_node.settings import DeliverySettings, Settings
from dicom_node.store.base import DeliveryRecord, RemoteNode, Store, StudyRecord
from sr_writer.kinds import send_rank

LOG = logging.getLogger(__name__)

SOP_CLASS_NOT_SUPPORTED = 0x0122


class AssociationFailure(Exception):
    """No association with the destination; ``transient`` says whether trying later may help."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


# ---- status taxonomy ---------------------------------------------------------------------------


def backoff_delay(attempt: int, policy: DeliverySettings, rng: random.Random | None = None) -> float:
    """Seconds to wait before attempt ``attempt + 1``: exponential, capped, with "equal jitter".

    Half of the exponential delay is fixed and half random, so destinations coming back after an
    outage are not hit by every node at the same instant, yet retries never come sooner than half the step.
    """
    rng = rng or random.Random()
    step = min(policy.backoff_max_s, policy.backoff_base_s * (2 ** max(0, attempt - 1)))
    return float(step / 2 + rng.uniform(0, step / 2))


def sort_for_sending(objects: Sequence[OutgoingObject]) -> list[OutgoingObject]:
    """In the send order of :mod:`sr_writer.kinds` (SR/SEG first, then the objects that reference them; stable within a kind)."""
    return sorted(objects, key=lambda o: send_rank(o.kind))


# ---- C-STORE SCU -------------------------------------------------------------------------------


def _contexts_for(datasets: Sequence[Dataset]) -> list[PresentationContext]:
    """One presentation context per SOP class (plus 88.33 whenever 88.34 is sent, for the fallback).

    A compressed object (our SC is JPEG baseline, our SEG JPEG-LS Lossless) gets a context proposing
    just its syntax, then one proposing Deflated Explicit VR Little Endian (lossless, and box masks
    deflate to almost nothing), then the uncompressed ones: an acceptor picks one syntax per context,
    so listed together it may pick an uncompressed syntax although it takes a smaller one.
    """
    syntaxes: dict[str, list[str]] = {}
    compressed: dict[str, list[str]] = {}
    for ds in datasets:
        own = str(ds.file_meta.TransferSyntaxUID) if "TransferSyntaxUID" in getattr(ds, "file_meta", Dataset()) else None
        wanted = syntaxes.setdefault(str(ds.SOPClassUID), [])
        if own and pydicom.uid.UID(own).is_compressed:
            alternatives = compressed.setdefault(str(ds.SOPClassUID), [])
            for lossless in (own, DeflatedExplicitVRLittleEndian):
                if lossless not in alternatives:
                    alternatives.append(lossless)
            own = None
        for plain in (own, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if plain and plain not in wanted:
                wanted.append(plain)
    if COMPREHENSIVE_3D_SR in syntaxes:
        syntaxes.setdefault(COMPREHENSIVE_SR, list(syntaxes[COMPREHENSIVE_3D_SR]))
    contexts = [
        build_context(sop_class, [uid]) for sop_class, uids in compressed.items() for uid in sorted(uids, key=lambda u: u == DeflatedExplicitVRLittleEndian)
    ]
    return contexts + [build_context(sop_class, transfer_syntaxes) for sop_class, transfer_syntaxes in syntaxes.items()]


def _associate(ae: AE, destination: RemoteNode, contexts: list[PresentationContext], timeout_s: float) -> Association:
    """Open the association or raise AssociationFailure saying why and whether it is transient."""
    rejection: dict[str, object] = {}

    def remember_rejection(event: evt.Event) -> None:
        primitive = event.primitive  # type: ignore[attr-defined]
        if getattr(primitive, "result", None) in (0x01, 0x02):
            rejection.update(result=primitive.result, reason=primitive.reason_str, source=primitive.source_str)

    assoc = ae.associate(
        destination.host,
        destination.port,
        contexts=contexts,
        ae_title=destination.ae_title,
        evt_handlers=[(evt.EVT_ACSE_RECV, remember_rejection)],
        tls_args=_tls_args(destination),
    )
    if assoc.is_established:
        return assoc
    where = f"{destination.name} ({destination.ae_title}@{destination.host}:{destination.port})"
    if assoc.is_rejected:
        transient = rejection.get("result") == 0x02
        kind = "transient" if transient else "permanent"
        raise AssociationFailure(f"association rejected ({kind}) by {where}: {rejection.get('reason', 'no reason given')}", transient=transient)
    if assoc.is_aborted and not assoc.accepted_contexts and assoc.rejected_contexts:
        raise AssociationFailure(f"{where} accepted none of the SOP classes we send", transient=False)
    raise AssociationFailure(f"no association with {where}: connection refused, aborted or timed out", transient=True)


def _tls_args(destination: RemoteNode) -> Any:
    """pynetdicom tls_args for a TLS destination; its unusable TLS files are a permanent failure."""
    from dicom_node.net.tls import TlsConfigError, client_tls_args

    try:
        return client_tls_args(destination)
    except TlsConfigError as exc:
        raise AssociationFailure(str(exc), transient=False) from None


def _in_an_accepted_syntax(assoc: Association, ds: Dataset, sop_class: str) -> Dataset:
    """``ds`` in the smallest form the destination accepted for its SOP class.

    Our SC is JPEG baseline and our SEG JPEG-LS Lossless (compact in the PACS). Where the destination
    accepted neither that syntax nor Deflated Explicit VR Little Endian, it gets the pixels decompressed
    (Explicit VR LE), and our pseudo-binary SEG as a BINARY SEG (1 bit per pixel, an eighth of the
    bytes: :func:`sr_writer.seg.as_binary_seg`). Our colour SC goes to any destination without JPEG as
    PALETTE COLOR (a byte per pixel instead of three: :func:`sr_writer.sc.as_palette_sc`), deflated
    where Deflate was accepted.
    """
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if not syntax or not pydicom.uid.UID(syntax).is_compressed:
        return ds
    offered = {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts if str(cx.abstract_syntax) == sop_class and cx.transfer_syntax}
    if syntax in offered:
        return ds
    if sop_class == SEGMENTATION_STORAGE and ds.get("SegmentationType") == "FRACTIONAL" and DeflatedExplicitVRLittleEndian not in offered:
        from sr_writer.seg import as_binary_seg

        return as_binary_seg(ds)
    if sop_class == SECONDARY_CAPTURE and ds.get("SamplesPerPixel") == 3:
        from sr_writer.sc import as_palette_sc

        palette = as_palette_sc(ds)
        if DeflatedExplicitVRLittleEndian in offered:
            palette.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        return palette
    plain = copy.deepcopy(ds)  # the caller's dataset (and its file) stay compressed
    # Updates Transfer Syntax, Photometric Interpretation (YBR -> RGB) and lengths. Same SOP Instance UID:
    # pydicom would otherwise make a new one, and each delivery would leave another copy in the PACS.
    plain.decompress(generate_instance_uid=False)
    if DeflatedExplicitVRLittleEndian in offered:
        plain.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return plain


def _send_one(assoc: Association, ds: Dataset, fallback: Callable[[Dataset], Dataset]) -> StoreOutcome:
    """C-STORE one dataset on an open association, falling back 88.34 -> 88.33 where needed."""
    uid = str(ds.SOPInstanceUID)
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    sop_class = str(ds.SOPClassUID)
    if sop_class == COMPREHENSIVE_3D_SR and sop_class not in accepted and COMPREHENSIVE_SR in accepted:
        ds, sop_class = fallback(ds), COMPREHENSIVE_SR
    if sop_class not in accepted:
        return StoreOutcome(uid, "permanent", None, f"destination does not accept SOP class {sop_class}")
    ds = _in_an_accepted_syntax(assoc, ds, sop_class)
    response = assoc.send_c_store(ds)
    if not response or "Status" not in response:
        return StoreOutcome(uid, "transient", None, "no C-STORE response (timeout or association aborted)")
    status = int(response.Status)
    if status == SOP_CLASS_NOT_SUPPORTED and sop_class == COMPREHENSIVE_3D_SR and COMPREHENSIVE_SR in accepted:
        return _send_one(assoc, fallback(ds), fallback)
    outcome = classify_status(status)
    error = None if outcome == "sent" else f"C-STORE status 0x{status:04X}"
    if outcome == "sent" and status:
        LOG.info("destination stored %s with warning 0x%04X", uid, status)
    return StoreOutcome(uid, outcome, status, error, sent_sop_class_uid=sop_class)


def send_objects(
    destination: RemoteNode,
    objects: Sequence[OutgoingObject],
    *,
    calling_ae: str,
    timeout_s: float,
    fallback: Callable[[Dataset], Dataset],
    study_instance_uid: str | None = None,
) -> list[StoreOutcome]:
    """Send ``objects`` to ``destination`` on one association; one outcome per object, in send order.

    ``fallback`` turns a Comprehensive 3D SR dataset into a Comprehensive SR one (sr_writer's
    ``comprehensive_sr_fallback``); it is passed in so this module stays free of writer details.
    ``study_instance_uid``: the study they belong to (a DICOMweb destination's STOW-RS goes to that
    study's URL and refuses an object of another study; None: the study most of them name).
    """
    ordered = sort_for_sending(objects)
    if not ordered:
        return []
    if destination.url:  # a DICOMweb destination: STOW-RS, the same outcomes (issue 23)
        from dicom_node.pipeline.delivery_dicomweb import store_over_http

        return store_over_http(destination, ordered, timeout_s=timeout_s, fallback=fallback, study_instance_uid=study_instance_uid)
    datasets = [pydicom.dcmread(obj.path) for obj in ordered]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    try:
        assoc = _associate(ae, destination, _contexts_for(datasets), timeout_s)
    except AssociationFailure as exc:
        outcome: Outcome = "transient" if exc.transient else "permanent"
        return [StoreOutcome(obj.sop_instance_uid, outcome, None, str(exc)) for obj in ordered]
    outcomes: list[StoreOutcome] = []
    try:
        for obj, ds in zip(ordered, datasets):
            if not assoc.is_established:  # the peer aborted mid-way: the rest is worth another try
                outcomes.append(StoreOutcome(obj.sop_instance_uid, "transient", None, "association aborted by the destination"))
                continue
            outcomes.append(_send_one(assoc, ds, fallback))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


# ---- one study version to its destinations -------------------------------------------------------


@dataclass
class DestinationRound:
    """Where one destination stands for a study version after a delivery pass."""

    name: str
    total: int = 0
    sent: int = 0
    retrying: int = 0
    failed: int = 0
    dead: int = 0
    #: The highest attempt count among its objects (for the log and ``studies``).
    attempts: int = 0
    #: When the next try is due (retrying only).
    next_attempt_at: datetime | None = None
    #: Distinct reasons of its failures, each once.
    reasons: list[str] = field(default_factory=list)

    @property
    def settled(self) -> bool:
        return self.retrying == 0

    @property
    def complete(self) -> bool:
        """Got every object it asked for."""
        return self.sent == self.total

    def describe(self) -> str:
        """One phrase for logs, ``studies`` and the study's error text, e.g.
        ``pacs-b: 0/5 sent, 5 retrying (attempt 3, next try 12:00:05 UTC): no association ...``."""
        parts = [f"{self.sent}/{self.total} sent"]
        if self.retrying:
            when = self.next_attempt_at.strftime("%H:%M:%S UTC") if self.next_attempt_at else "now"
            parts.append(f"{self.retrying} retrying (attempt {self.attempts}, next try {when})")
        if self.failed:
            parts.append(f"{self.failed} failed")
        if self.dead:
            parts.append(f"{self.dead} dead-lettered")
        text = f"{self.name}: " + ", ".join(parts)
        return text + (": " + "; ".join(self.reasons) if self.reasons else "")


@dataclass
class DeliveryRound:
    """Summary of one delivery pass over every destination of a study version."""

    destinations: list[DestinationRound] = field(default_factory=list)
    #: Seconds until the earliest retry is due; None when nothing is left to retry.
    next_attempt_in: float | None = None

    def _total(self, name: str) -> int:
        return sum(getattr(d, name) for d in self.destinations)

    @property
    def sent(self) -> int:
        return self._total("sent")

    @property
    def retrying(self) -> int:
        return self._total("retrying")

    @property
    def failed(self) -> int:
        return self._total("failed")

    @property
    def dead(self) -> int:
        return self._total("dead")

    @property
    def finished(self) -> bool:
        return self.next_attempt_in is None

    @property
    def errors(self) -> list[str]:
        """One line per destination that did not get everything, each reason once."""
        return [d.describe() for d in self.destinations if not d.complete and d.settled]

    def outcome_text(self) -> str | None:
        """The study's error text once settled: what each incomplete destination missed and why (None: all delivered)."""
        missing = [d for d in self.destinations if not d.complete]
        if not missing:
            return None
        complete = [d.name for d in self.destinations if d.complete]
        lead = f"delivered to {', '.join(complete)}; not to " if complete else "not delivered to "
        return lead + f"{', '.join(d.name for d in missing)}: " + "; ".join(d.describe() for d in missing)


def route_destinations(store: Store, study: StudyRecord, settings: Settings) -> list[RemoteNode]:
    """The destinations of the study's current version, each carrying the output profile to use.

    The routing rules decide (:func:`dicom_node.pipeline.routing.decide_routes`: the first matching rule's
    destinations and profile); when none matches, the default: the node that sent the study (matched
    at acceptance by AE title *and* host, never a namesake on another host) when it is also a
    destination, plus every default destination, each in its own profile.
    """
    from dicom_node.pipeline.routing import decide_routes

    return [route.node for route in decide_routes(store, settings, study).routes]


def objects_for_destination(store: Store, settings: Settings, study_instance_uid: str, version: int, destination: RemoteNode) -> list[OutgoingObject]:
    """The produced objects this destination's output profile asks for."""
    kinds = set(settings.output.profile(destination.profile))
    return [
        OutgoingObject(o.sop_instance_uid, o.sop_class_uid, o.kind, settings.storage.results_dir / o.path)
        for o in store.list_produced_objects(study_instance_uid, version)
        if o.kind in kinds
    ]


def deliver_study_version(
    store: Store,
    settings: Settings,
    study: StudyRecord,
    *,
    fallback: Callable[[Dataset], Dataset],
    destinations: Sequence[RemoteNode] | None = None,
    resend: bool = False,
    rng: random.Random | None = None,
    now: datetime | None = None,
) -> DeliveryRound:
    """Send what is owed to each destination that is due, record each instance's status, plan the next try.

    Each destination has its own state: one that is down is retried with capped backoff until
    ``delivery.retry_window_s`` has passed since its first attempt (or ``max_attempts`` tries), then
    its objects are dead-lettered; another destination meanwhile gets and keeps everything. A
    destination whose next try is not due yet is left alone (a redelivered or duplicated task does
    not retry early). ``resend`` (the admin's ``resend``) sends everything again with a fresh window;
    otherwise instances already ``sent``, ``failed`` (permanent) or ``dead`` are left alone.
    """
    uid, version = study.study_instance_uid, study.version
    policy = settings.delivery
    now = now or _now()
    targets = list(destinations) if destinations is not None else route_destinations(store, study, settings)
    previous = {(d.destination, d.sop_instance_uid): d for d in store.list_deliveries(uid) if d.study_version == version}
    summary = DeliveryRound()
    for destination in targets:
        state = DestinationRound(destination.name)
        summary.destinations.append(state)
        owed, records = [], {}
        for obj in objects_for_destination(store, settings, uid, version, destination):
            state.total += 1
            record = records[obj.sop_instance_uid] = previous.get((destination.name, obj.sop_instance_uid))
            if resend or record is None or record.status in ("pending", "retrying"):
                owed.append(obj)
            else:
                _count(state, record.status, record.attempts, record.error)
        due = [r.next_attempt_at for r in records.values() if r is not None and r.status == "retrying" and r.next_attempt_at]
        if owed and not resend and due and min(due) > now:  # backing off: not this destination's turn yet
            state.retrying += len(owed)
            state.attempts = max([state.attempts] + [r.attempts for o in owed if (r := records[o.sop_instance_uid]) is not None])
            state.next_attempt_at = min(due)
            summary.next_attempt_in = _earliest(summary.next_attempt_in, (state.next_attempt_at - now).total_seconds())
            continue
        if owed and not resend:
            hold_until = now + timedelta(seconds=policy.timeout_s * (2 + len(owed)))
            if not store.claim_deliveries(uid, version, destination.name, [o.sop_instance_uid for o in owed], now, hold_until):
                # Another deliver task is making this attempt (a duplicated message): it records the outcome.
                LOG.info("study %s v%d: delivery to %s is being attempted by another task", uid, version, destination.name)
                state.retrying += len(owed)
                summary.next_attempt_in = _earliest(summary.next_attempt_in, (hold_until - now).total_seconds())
                continue
        audit.record_objects_sent(store, settings, uid, version, destination, None, {o.sop_instance_uid: o.sop_class_uid for o in owed})
        outcomes = send_objects(destination, owed, calling_ae=settings.node.ae_title, timeout_s=policy.timeout_s, fallback=fallback,
                                study_instance_uid=uid)  # fmt: skip
        audit.record_objects_sent(store, settings, uid, version, destination, outcomes, {o.sop_instance_uid: o.sop_class_uid for o in owed})
        if outcomes:  # destination health: this attempt stored something, failed for something, or both
            failure = next((o.error or "not stored" for o in outcomes if o.outcome != "sent"), None)
            store.record_destination_attempt(destination.name, now, stored=any(o.outcome == "sent" for o in outcomes), failure=failure)
        # This try's number and the start of the window, from the objects being tried (a resend starts afresh).
        tried = [] if resend else [r for r in (records[o.sop_instance_uid] for o in owed) if r is not None]
        attempts = 1 + max([0] + [r.attempts for r in tried])
        first = min([now] + [r.first_attempt_at for r in tried if r.first_attempt_at])
        give_up = policy.max_attempts and attempts >= policy.max_attempts
        window_over = policy.retry_window_s > 0 and (now - first).total_seconds() >= policy.retry_window_s
        delay = backoff_delay(attempts, policy, rng)
        next_at = now + timedelta(seconds=delay)
        for outcome in outcomes:
            status = _status_after(outcome, bool(give_up or window_over))
            error = outcome.error
            if status == "dead":
                error = f"dead-lettered after {attempts} attempts in {_duration(now - first)}: {outcome.error}"
            store.upsert_delivery(
                DeliveryRecord(uid, version, destination.name, outcome.sop_instance_uid, status, attempts, outcome.status,
                               error, now, first, next_at if status == "retrying" else None)
            )  # fmt: skip
            _count(state, status, attempts, error)
            if status == "retrying":
                state.next_attempt_at = next_at
        if state.retrying:
            reason = next(o.error for o in outcomes if o.outcome == "transient")
            LOG.warning("study %s v%d: delivery to %s, attempt %d: %s; next try in %.1f s",
                        uid, version, destination.name, attempts, reason, delay)  # fmt: skip
            summary.next_attempt_in = _earliest(summary.next_attempt_in, delay)
        elif state.dead:
            LOG.error("study %s v%d: delivery to %s dead-lettered after %d attempts in %s",
                      uid, version, destination.name, attempts, _duration(now - first))  # fmt: skip
    return summary


def _count(state: DestinationRound, status: str, attempts: int, error: str | None) -> None:
    """Add one object's status to its destination's tally (reasons kept once each)."""
    if status == "sent":
        state.sent += 1
        return
    state.attempts = max(state.attempts, attempts)
    setattr(state, status, getattr(state, status) + 1)
    if status != "retrying" and error and error not in state.reasons:
        state.reasons.append(error)


def destination_states(store: Store, settings: Settings, study: StudyRecord) -> list[DestinationRound]:
    """Where each destination of the study's current version stands, from the recorded deliveries (for ``studies``)."""
    records: dict[str, list[DeliveryRecord]] = {}
    for record in store.list_deliveries(study.study_instance_uid):
        if record.study_version == study.version:
            records.setdefault(record.destination, []).append(record)
    states = []
    for name, rows in sorted(records.items()):
        state = DestinationRound(name, total=len(rows))
        for row in rows:
            _count(state, row.status if row.status != "pending" else "retrying", row.attempts, row.error)
            if row.status == "retrying" and row.next_attempt_at:
                state.next_attempt_at = row.next_attempt_at if state.next_attempt_at is None else min(state.next_attempt_at, row.next_attempt_at)
            if row.status == "retrying" and row.error and row.error not in state.reasons:
                state.reasons.append(row.error)
        states.append(state)
    return states


def _earliest(current: float | None, candidate: float) -> float:
    candidate = max(0.0, candidate)
    return candidate if current is None else min(current, candidate)


def _duration(elapsed: timedelta) -> str:
    seconds = elapsed.total_seconds()
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _status_after(outcome: StoreOutcome, give_up: bool) -> str:
    if outcome.outcome == "sent":
        return "sent"
    if outcome.outcome == "permanent":
        return "failed"
    return "dead" if give_up else "retrying"


def _now() -> datetime:
    return datetime.now(UTC)
