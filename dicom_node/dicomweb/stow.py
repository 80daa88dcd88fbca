"""STOW-RS receive (PS3.18 10.5): each received part through the same rules as a C-STORE.

The HTTP layer (:mod:`dicom_node.api.routers.dicomweb_stow`) has authenticated the sender (a token
bound to a source node) and streamed the body into temporary files in the spool's ``.tmp``
(:mod:`dicom_node.dicomweb.multipart`); nothing was kept if the body was malformed. Here each part:

1. must be ``application/dicom`` and a Part 10 file (preamble, ``DICM``, File Meta Information)
   in a transfer syntax the node accepts on its DICOM port;
2. passes the SCP's header checks (:func:`dicom_node.net.dataset.parse_instance_header`, on a
   memory map of the file: the pixel data is never read), the File Meta's SOP Class/Instance UIDs
   standing in for the C-STORE request's;
3. on the study-scoped URL, must belong to that study;
4. is taken in by :class:`dicom_node.net.intake.InstanceIntake` (watermark, durable spool by
   renaming the part file into place, record, audit), exactly as a C-STORE is.

The file is stored as received (the sender's File Meta Information kept). The answer is the Store
Instances Response Module (PS3.18 10.5.3) as ``application/dicom+json``: 200 all stored, 202 some
failed (Failed SOP Sequence with a Failure Reason per instance), 409 none stored; 503 when nothing
was stored only for want of resources (disk, state store), so the sender retries.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_preamble
from pydicom.sequence import Sequence
from pydicom.uid import UID

from dicom_node.audit.trail import AuditTrail, Peer
from dicom_node.dicomweb.multipart import Part
from dicom_node.net.dataset import STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS, InstanceHeader, MalformedDataset, parse_instance_header
from dicom_node.net.intake import Admission, InstanceIntake, Sender
from dicom_node.net.part10 import PREAMBLE
from dicom_node.net.transfer_syntaxes import accepted_transfer_syntaxes
from dicom_node.settings import Settings
from dicom_node.store.base import RemoteNode, Store, StoreError
from dicom_node.store.spool import SpooledFile, adopt_instance, ensure_adopted, is_valid_uid

log = logging.getLogger(__name__)

#: Audit event of one STOW-RS request (counts, like an association's summary).
STOW_REQUEST = "stow_request"
DICOM_MEDIA_TYPE = "application/dicom"
#: Called after a request of a ``complete_on_release`` source: (source, study UIDs it stored).
RequestEndCallback = Callable[[RemoteNode, set[str]], object]


@dataclass(frozen=True)
class InstanceOutcome:
    """One part's fate, for the response."""

    sop_class_uid: str
    sop_instance_uid: str
    status: int
    reason: str = ""
    #: Where a stored instance is retrieved (WADO-RS): its study and series.
    study_instance_uid: str = ""
    series_instance_uid: str = ""

    @property
    def stored(self) -> bool:
        return self.status == 0


@dataclass
class StowResult:
    """The answer to one STOW-RS request."""

    outcomes: list[InstanceOutcome] = field(default_factory=list)
    study_uids: set[str] = field(default_factory=set)
    received: int = 0
    duplicates: int = 0
    refused: int = 0
    out_of_resources: int = 0
    bytes: int = 0

    @property
    def http_status(self) -> int:
        stored = sum(o.stored for o in self.outcomes)
        if stored == len(self.outcomes):
            return 200
        if stored:
            return 202
        return 503 if self.out_of_resources and not self.refused else 409

    def response(self, base_url: str, study_uid: str | None) -> Dataset:
        """The Store Instances Response Module (PS3.18 Table 10.5.3-1)."""
        body = Dataset()
        study = study_uid or (next(iter(self.study_uids)) if len(self.study_uids) == 1 else None)
        if study:
            body.RetrieveURL = f"{base_url}/studies/{study}"
        referenced, failed = [], []
        for outcome in self.outcomes:
            item = Dataset()
            item.ReferencedSOPClassUID = outcome.sop_class_uid
            item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
            if outcome.stored:
                item.RetrieveURL = f"{base_url}/studies/{outcome.study_instance_uid}/series/{outcome.series_instance_uid}/instances/{outcome.sop_instance_uid}"
                referenced.append(item)
            else:
                item.FailureReason = outcome.status
                failed.append(item)
        if failed:
            body.FailedSOPSequence = Sequence(failed)
        if referenced:
            body.ReferencedSOPSequence = Sequence(referenced)
        return body


class StowReceiver:
    """Takes in the parts of STOW-RS requests (one per HTTP process, shared by its threads)."""

    def __init__(self, settings: Settings, store: Store, audit_trail: AuditTrail, on_request_end: RequestEndCallback | None = None) -> None:
        self.settings = settings
        self.intake = InstanceIntake(settings, store, audit_trail)
        self.audit = audit_trail
        self.on_request_end = on_request_end
        self.spool_dir = settings.storage.spool_dir
        self.transfer_syntaxes = {str(uid) for uid in accepted_transfer_syntaxes()}

    def store_parts(self, source: RemoteNode, host: str | None, parts: list[Part], study_uid: str | None) -> StowResult:
        """Store every part (deleting each part's temporary file), audit the request, return the outcomes."""
        started = time.monotonic()
        sender = Sender(Peer(calling_ae=source.ae_title, called_ae=None, host=host), source, "STOW-RS")
        result = StowResult()
        try:
            for number, part in enumerate(parts, 1):
                outcome = self._store_part(sender, part, number, study_uid, result)
                result.outcomes.append(outcome)
        finally:
            for part in parts:
                part.discard()  # adopted ones were renamed away already
        self._summarise(sender, result, time.monotonic() - started)
        if source.complete_on_release and result.study_uids and self.on_request_end:
            try:
                self.on_request_end(source, set(result.study_uids))
            except StoreError as exc:  # the quiet period closes them later; the instances are stored
                log.error("closing studies at the end of a STOW-RS request of %s failed: %s", source.name, exc)
        return result

    def _store_part(self, sender: Sender, part: Part, number: int, study_uid: str | None, result: StowResult) -> InstanceOutcome:
        try:
            admission, header = self._admit(sender, part, number, study_uid)
        except MalformedDataset as exc:
            admission, header = self.intake.refuse(sender, f"(part {number})", exc.status, exc.reason), None
        sop_class = header.sop_class_uid if header else ""
        sop_instance = header.sop_instance_uid if header else ""
        if admission.stored:
            result.bytes += admission.size
            result.study_uids.add(header.study_instance_uid if header else "")
            if admission.outcome == "duplicate":
                result.duplicates += 1
            else:
                result.received += 1
        elif admission.outcome == "refused":
            result.refused += 1
        else:
            result.out_of_resources += 1
        return InstanceOutcome(sop_class, sop_instance, admission.status, admission.reason,
                               header.study_instance_uid if header else "", header.series_instance_uid if header else "")  # fmt: skip

    def _admit(self, sender: Sender, part: Part, number: int, study_uid: str | None) -> tuple[Admission, InstanceHeader | None]:
        if part.content_type not in ("", DICOM_MEDIA_TYPE):
            raise MalformedDataset(f"part {number} is {part.content_type!r}, not {DICOM_MEDIA_TYPE}")
        fixed = with_preamble(part, number)
        try:
            return self._admit_part10(sender, fixed, number, study_uid)
        finally:
            if fixed is not part:
                fixed.discard()  # a no-op once adopted (renamed into the spool)

    def _admit_part10(self, sender: Sender, part: Part, number: int, study_uid: str | None) -> tuple[Admission, InstanceHeader | None]:
        with _MappedPart10(part.path, number) as mapped:
            if mapped.transfer_syntax not in self.transfer_syntaxes:
                raise MalformedDataset(f"part {number}: transfer syntax {mapped.transfer_syntax[:64]!r} is not one the node accepts")
            header = parse_instance_header(mapped.dataset, UID(mapped.transfer_syntax), mapped.sop_class_uid, mapped.sop_instance_uid)
        if study_uid is not None and header.study_instance_uid != study_uid:
            reason = f"instance {header.sop_instance_uid} belongs to study {header.study_instance_uid}, not to the study of the request URL"
            return self.intake.refuse(sender, header.sop_instance_uid, STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS, reason), header
        writer = _PartWriter(self.spool_dir, header, part)
        return self.intake.admit(sender, header, mapped.transfer_syntax, part.size, writer), header

    def _summarise(self, sender: Sender, result: StowResult, seconds: float) -> None:
        log.info(
            "STOW-RS from %s (%s@%s): %d stored, %d duplicate, %d refused, %d out-of-resources, %.1f MB in %.1f s",
            sender.source.name if sender.source else "?",
            sender.peer.calling_ae,
            sender.peer.host,
            result.received,
            result.duplicates,
            result.refused,
            result.out_of_resources,
            result.bytes / 1e6,
            seconds,
        )
        self.audit.record(
            STOW_REQUEST,
            sender.peer,
            source=sender.source.name if sender.source else None,
            received=result.received,
            duplicates=result.duplicates,
            refused=result.refused,
            out_of_resources=result.out_of_resources,
            bytes=result.bytes,
            seconds=round(seconds, 3),
            studies=sorted(result.study_uids),
        )


@dataclass(frozen=True)
class _PartWriter:
    """A STOW-RS part's file (in the spool's ``.tmp``) renamed into the spool."""

    spool_dir: Path
    header: InstanceHeader
    part: Part

    def write(self) -> SpooledFile:
        return adopt_instance(self.spool_dir, self.header.study_instance_uid, self.header.sop_instance_uid, self.part.path, self.part.sha256, self.part.size)

    def rewrite(self, spooled: SpooledFile) -> None:
        ensure_adopted(self.spool_dir, spooled, self.header.study_instance_uid, self.header.sop_instance_uid, self.part.path)


def with_preamble(part: Part, number: int) -> Part:
    """The part as a Part 10 file with its preamble: a sender that wrote the File Meta Information
    without the 128-byte preamble and ``DICM`` (pydicom's ``dcmwrite`` of a data set that has no
    ``preamble``, as dicomweb-client sends one) gets them added, in a new file, so that the spool
    only holds files every reader opens. Anything else is returned as it is (and refused later if bad)."""
    with open(part.path, "rb") as handle:
        head = handle.read(132)
        if head[128:132] == b"DICM" or head[:2] != b"\x02\x00":
            return part
        fixed = part.path.with_name(part.path.stem + "-p10.part")
        digest = hashlib.sha256(PREAMBLE)
        handle.seek(0)
        try:
            with open(fixed, "xb") as out:
                out.write(PREAMBLE)
                while chunk := handle.read(1024 * 1024):
                    digest.update(chunk)
                    out.write(chunk)
        except BaseException:
            fixed.unlink(missing_ok=True)
            raise
    part.discard()
    log.debug("part %d had no preamble: added", number)
    return Part(part.headers, fixed, part.size + len(PREAMBLE), digest.hexdigest())


class _MappedPart10:
    """A Part 10 file, memory-mapped: its File Meta UIDs and a view of the data set (nothing copied)."""

    def __init__(self, path: Path, number: int) -> None:
        self.path, self.number = path, number
        self.transfer_syntax = self.sop_class_uid = self.sop_instance_uid = ""
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None

    def __enter__(self) -> _MappedPart10:
        with open(self.path, "rb") as handle:
            offset = self._read_meta(handle)
            if self.path.stat().st_size <= offset:
                raise MalformedDataset(f"part {self.number} has File Meta Information but no data set")
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self._view = memoryview(self._map)[offset:]
        return self

    @property
    def dataset(self) -> memoryview:
        assert self._view is not None
        return self._view

    def __exit__(self, *exc: object) -> None:
        if self._view is not None:
            self._view.release()
        if self._map is not None:
            self._map.close()

    def _read_meta(self, handle: BinaryIO) -> int:
        try:
            read_preamble(handle, False)
            meta = read_dataset(handle, is_implicit_VR=False, is_little_endian=True, stop_when=lambda tag, vr, length: tag.group != 2)
        except (InvalidDicomError, EOFError, ValueError, struct.error, NotImplementedError) as exc:
            raise MalformedDataset(f"part {self.number} is not a DICOM Part 10 file ({type(exc).__name__}: no preamble and DICM, or no File Meta)") from None
        values = {}
        for keyword in ("TransferSyntaxUID", "MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID"):
            value = str(meta.get(keyword) or "").strip("\0 ")
            if not is_valid_uid(value):
                raise MalformedDataset(f"part {self.number}: File Meta Information lacks a valid {keyword}")
            values[keyword] = value
        self.transfer_syntax = values["TransferSyntaxUID"]
        self.sop_class_uid = values["MediaStorageSOPClassUID"]
        self.sop_instance_uid = values["MediaStorageSOPInstanceUID"]
        return handle.tell()
