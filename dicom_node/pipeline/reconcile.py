"""Start-up reconciliation: spooled files the state store never heard of.

The SCP renames an instance into the spool, then records it, then answers Success. A crash
between the rename and the commit leaves a complete, fsync'd file under its final name with no row
(the sender got no Success). If the sender re-sends, the handler finds the file and records it; if
it never does, the image would sit there unseen. Before the SCP accepts anything, ``serve`` walks
the spool and records every such file (audited as ``instance_recovered``), so it joins its study
like any received instance. A file whose content no longer matches its name is moved to
``.quarantine`` with a log line instead; nothing is deleted.

Cost: one directory listing and one store query per study directory, plus reading the header and
hashing each unrecorded file. Files already recorded are not opened.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pydicom

from dicom_node.audit import trail as audit
from dicom_node.audit.trail import AuditTrail
from dicom_node.store.base import InstanceRecord, Store
from dicom_node.store.spool import TEMP_DIR_NAME, instance_relative_path, is_valid_uid

log = logging.getLogger(__name__)

QUARANTINE_DIR_NAME = ".quarantine"


@dataclass
class ReconcileReport:
    studies_checked: int = 0
    recovered: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _quarantine(spool_dir: Path, path: Path, reason: str, report: ReconcileReport) -> None:
    target_dir = spool_dir / QUARANTINE_DIR_NAME / path.parent.name
    target_dir.mkdir(parents=True, exist_ok=True)
    os.replace(path, target_dir / path.name)
    relative = str(path.relative_to(spool_dir))
    report.quarantined.append(relative)
    log.error("spool: %s is not recorded and cannot be recovered (%s): moved to %s", relative, reason, QUARANTINE_DIR_NAME)


def _recover(spool_dir: Path, path: Path, store: Store, trail: AuditTrail | None, report: ReconcileReport) -> None:
    relative = str(path.relative_to(spool_dir))
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        study_uid, sop_uid = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
        sop_class_uid, series_uid = str(ds.SOPClassUID), str(ds.SeriesInstanceUID)
        transfer_syntax_uid = str(ds.file_meta.TransferSyntaxUID)
    except Exception as exc:
        _quarantine(spool_dir, path, f"header unreadable: {exc}", report)
        return
    sha256 = _sha256(path)
    if instance_relative_path(study_uid, sop_uid, sha256) != relative:
        _quarantine(spool_dir, path, "content does not match its name", report)
        return
    record = InstanceRecord(
        sop_instance_uid=sop_uid,
        study_instance_uid=study_uid,
        path=relative,
        size=path.stat().st_size,
        sha256=sha256,
        calling_ae="",  # unknown: the association that sent it ended without a Success
        received_at=datetime.fromtimestamp(path.stat().st_mtime, UTC),
        sop_class_uid=sop_class_uid,
        series_instance_uid=series_uid,
        transfer_syntax_uid=transfer_syntax_uid,
    )
    outcome = store.record_instance(record)
    report.recovered.append(relative)
    log.warning("spool: recorded %s, left unrecorded by an interrupted store (%s)", relative, outcome.kind)
    if trail is not None:
        trail.record(audit.INSTANCE_RECOVERED, None, study_instance_uid=study_uid, sop_instance_uid=sop_uid, path=relative)


def reconcile_spool(spool_dir: Path, store: Store, trail: AuditTrail | None = None) -> ReconcileReport:
    """Record every complete spooled file that has no instance row. Run before the SCP starts."""
    started = time.monotonic()
    report = ReconcileReport()
    if not spool_dir.is_dir():
        return report
    for study_dir in sorted(spool_dir.iterdir()):
        if not study_dir.is_dir() or study_dir.name in (TEMP_DIR_NAME, QUARANTINE_DIR_NAME) or not is_valid_uid(study_dir.name):
            continue
        files = sorted(study_dir.glob("*.dcm"))
        if not files:
            continue
        report.studies_checked += 1
        recorded = {instance.path for instance in store.list_instances(study_dir.name)}
        for path in files:
            if str(path.relative_to(spool_dir)) not in recorded:
                _recover(spool_dir, path, store, trail, report)
    report.seconds = time.monotonic() - started
    if report.recovered or report.quarantined:
        log.warning(
            "spool reconciliation: %d study directories checked, %d file(s) recovered, %d quarantined, %.2f s",
            report.studies_checked,
            len(report.recovered),
            len(report.quarantined),
            report.seconds,
        )
    else:
        log.info("spool reconciliation: %d study directories checked, all recorded (%.2f s)", report.studies_checked, report.seconds)
    return report
