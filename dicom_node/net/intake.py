"""Taking in one received instance: the rules C-STORE and STOW-RS share.

Whoever received the bytes (the SCP's C-STORE handler, the STOW-RS endpoint) has parsed the header
(:func:`dicom_node.net.dataset.parse_instance_header`) and hands over a :class:`SpoolWriter` that
knows how to put the bytes into the spool. :meth:`InstanceIntake.admit` then applies, in this order:

1. the disk watermark (``storage.min_free_bytes``): below it, out of resources (0xA700), nothing written;
2. durable spooling (data fsync'd, renamed, directory fsync'd) before anything else;
3. one row in the state store (duplicate / new / new version); the store down: the file just
   written is removed again and the answer is out of resources, so the sender retries;
4. a duplicate whose file a purge removed meanwhile is written again before the answer;
5. pixel data that cannot match the header: kept, marked failed, audited;
6. a new version of an instance: audited.

Only after that may the sender hear Success. :meth:`InstanceIntake.refuse` logs and audits an
instance refused before it reached the spool (a malformed data set). The audit's peer carries the
sender as an AE title does: for STOW-RS, the AE title of the source the token is bound to.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

from dicom_node.audit import trail as audit
from dicom_node.audit.trail import AuditTrail, Peer
from dicom_node.net.dataset import STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS, InstanceHeader
from dicom_node.settings import Settings
from dicom_node.store.base import InstanceRecord, RemoteNode, Store, StoreError, StoreUnavailable
from dicom_node.store.spool import SpooledFile, SpoolFull, check_free_space, remove_instance

log = logging.getLogger(__name__)

Outcome = Literal["new", "duplicate", "new_version", "refused", "out_of_resources"]


class SpoolWriter(Protocol):
    """Puts one instance's bytes into the spool (the C-STORE bytes in memory, a STOW-RS part's file)."""

    def write(self) -> SpooledFile:
        """Durably into the spool under its content-addressed name; OSError on failure, nothing left."""
        ...

    def rewrite(self, spooled: SpooledFile) -> None:
        """The file ``write`` found already there has been purged since: write it again."""
        ...


@dataclass(frozen=True)
class Sender:
    """Who sent the instance: the audit's peer and the configured source it matched (None: unknown)."""

    peer: Peer
    source: RemoteNode | None
    #: How it came: ``C-STORE`` or ``STOW-RS`` (log lines only).
    via: str = "C-STORE"


@dataclass(frozen=True)
class Admission:
    """What became of one instance, and the DIMSE status that says so (0 = success)."""

    outcome: Outcome
    status: int
    reason: str = ""
    size: int = 0
    study_instance_uid: str | None = None

    @property
    def stored(self) -> bool:
        return self.status == STATUS_SUCCESS


class InstanceIntake:
    """The acceptance rules of received instances (one per process, shared by its threads)."""

    def __init__(self, settings: Settings, store: Store, audit_trail: AuditTrail) -> None:
        self.settings = settings
        self.store = store
        self.audit = audit_trail
        self.spool_dir: Path = settings.storage.spool_dir

    def refuse(self, sender: Sender, sop_instance_uid: str, status: int, reason: str) -> Admission:
        """An instance refused before the spool (malformed, wrong study): logged and audited, never patient data."""
        log.warning("%s of %s from %s refused with 0x%04X: %s", sender.via, sop_instance_uid[:64], sender.peer.calling_ae, status, reason)
        self.audit.record(audit.INSTANCE_REJECTED, sender.peer, sop_instance_uid=sop_instance_uid[:64], status=status, reason=reason)
        return Admission("refused", status, reason)

    def admit(self, sender: Sender, header: InstanceHeader, transfer_syntax: str, size: int, writer: SpoolWriter) -> Admission:
        """Spool, record and audit one instance whose header is valid; see the module docstring."""
        try:
            check_free_space(self.spool_dir, self.settings.storage.min_free_bytes, size)
            spooled = writer.write()
        except SpoolFull as exc:
            return self._out_of_resources(sender, header, str(exc), "spool below free-space watermark")
        except OSError as exc:
            return self._out_of_resources(sender, header, f"writing to the spool failed: {exc}", "spool write failed")

        record = InstanceRecord(
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            study_instance_uid=header.study_instance_uid,
            series_instance_uid=header.series_instance_uid,
            transfer_syntax_uid=transfer_syntax,
            path=spooled.relative_path,
            size=spooled.size,
            sha256=spooled.sha256,
            calling_ae=sender.peer.calling_ae or "",
            received_at=datetime.now(UTC),
        )
        try:
            # The node matched at acceptance (AE title and host, or the token): results go back to it, not to a namesake.
            outcome = self.store.record_instance(record, source_node=sender.source.name if sender.source else None, source_host=sender.peer.host)
        except StoreUnavailable as exc:
            if spooled.created:
                # Not acknowledged, so not kept: the sender retries and we write it again.
                remove_instance(self.spool_dir, spooled.relative_path)
            return self._out_of_resources(sender, header, f"state store unavailable: {exc}", "state store unavailable")
        if outcome.kind != "duplicate":
            try:
                writer.rewrite(spooled)
            except OSError as exc:
                return self._out_of_resources(sender, header, f"re-writing to the spool failed: {exc}", "spool write failed")

        if header.pixel_problem and outcome.kind != "duplicate" and outcome.instance.id is not None:
            # Valid DICOM whose pixels cannot be decoded as described: kept (acknowledged, nothing
            # lost) but marked failed, so selection and analysis leave it alone.
            try:
                self.store.set_instance_state(outcome.instance.id, "failed", f"pixel data unusable: {header.pixel_problem}")
            except StoreError as exc:  # the instance itself is durable and recorded: still a success
                log.error("could not flag instance %s: %s", header.sop_instance_uid, exc)
            log.warning("instance %s from %s stored but flagged: %s", header.sop_instance_uid, sender.peer.calling_ae, header.pixel_problem)
            self.audit.record(
                audit.INSTANCE_FLAGGED,
                sender.peer,
                study_instance_uid=header.study_instance_uid,
                sop_instance_uid=header.sop_instance_uid,
                reason=header.pixel_problem,
            )
        if outcome.kind == "new_version":
            log.info("instance %s received again with different content: kept as a new version", header.sop_instance_uid)
            self.audit.record(
                audit.INSTANCE_NEW_VERSION,
                sender.peer,
                study_instance_uid=header.study_instance_uid,
                sop_instance_uid=header.sop_instance_uid,
                sha256=spooled.sha256,
                path=spooled.relative_path,
            )
        log.debug("stored %s by %s (%s, %d bytes, %s)", header.sop_instance_uid, sender.via, transfer_syntax, spooled.size, outcome.kind)
        return Admission(outcome.kind, STATUS_SUCCESS, size=spooled.size, study_instance_uid=header.study_instance_uid)

    def _out_of_resources(self, sender: Sender, header: InstanceHeader, detail: str, comment: str) -> Admission:
        log.error("%s of %s from %s answered 0xA700 (out of resources): %s", sender.via, header.sop_instance_uid, sender.peer.calling_ae, detail)
        return Admission("out_of_resources", STATUS_OUT_OF_RESOURCES, comment, study_instance_uid=header.study_instance_uid)
