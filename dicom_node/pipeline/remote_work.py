"""The node's side of analyze workers on other hosts (issue 23): claims, leases, results over HTTP.

A remote worker has no shared ``data_dir`` and no database. It takes the same ``analyze`` Celery
message (study UID, version) from the broker, then does over the node's HTTP service what a local
worker does in the state store and the spool:

1. **claim** (:func:`claim_analysis`): the same compare-and-set ``queued -> analyzing``; the node writes
   the lease in its own ``data_dir`` (owner: the worker token's name and a fresh claim id) and
   answers what the worker needs: the images the selection rules chose (by UID, read with WADO-RS),
   results already recorded (a re-queued study is not analysed twice), the object kinds and the
   output settings (so a remote result is byte for byte what a local worker would write);
2. **renew** (:func:`renew_lease`) every third of ``queue.lease_s``: refused once the claim is lost
   (the lease ran out and dispatch re-queued the study), which stops the worker;
3. **one image's result** (:func:`record_image_result`): the result JSON, or why it failed;
4. **the result objects** by STOW-RS (:func:`accept_result_object`): each must be an object the node
   expects, one whose SOP Instance UID is derived from a recorded result (source image, the
   model's Device UID, the version, a kind), so nothing else can be slipped into delivery. It is
   written to ``results/<study>/v<version>/<kind>-<uid>.dcm`` (fsync, rename) and recorded, exactly
   as a local worker does;
5. **complete** (:func:`complete_analysis`): the node checks that every image has its result and
   every object the worker made is stored, then moves the study on as a local worker does
   (``analyzed`` and the deliver task), or **fail** (:func:`fail_analysis`).

Every step is idempotent (deterministic UIDs, upserts), and nothing reaches delivery before the
complete step, so a worker killed at any point (mid-download, mid-upload) leaves a study that the
dispatch loop re-queues when the lease runs out, and no second copy in any PACS.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
from celery import Celery
from pydicom.errors import InvalidDicomError

from dicom_node.audit import trail as audit
from dicom_node.pipeline.analysis import StudyAnalysis, instances_to_analyse, kinds_for_study, record_analysis
from dicom_node.pipeline.dispatch import clear_lease, lease_is_live, lease_owner, write_lease
from dicom_node.settings import Settings
from dicom_node.store.base import ProducedObject, Store, StudyRecord

LOG = logging.getLogger(__name__)

#: PS3.18 / PS3.4 failure reasons of a result object the node will not keep.
PROCESSING_FAILURE = 0x0110
NOT_EXPECTED = 0xC000  # "Cannot understand": not a result object of this analysis
UID_MISMATCH = 0xA900  # the object's Study Instance UID is not the analysis's


class ClaimLost(Exception):
    """The worker no longer holds the study version (lease ran out and dispatch re-queued it, or it
    was finished or reopened meanwhile): the HTTP answer is 409 and the worker stops."""


class ResultRejected(ValueError):
    """A result the node will not record (bad JSON, an image not in the study): HTTP 422."""


def lease_owner_name(worker: str, claim_id: str) -> str:
    return f"worker-token {worker} claim {claim_id}"


# ---- claim and lease -----------------------------------------------------------------------------


def claim_analysis(store: Store, settings: Settings, study_instance_uid: str, version: int, worker: str) -> dict[str, Any]:
    """``queued -> analyzing`` for a remote worker; the work order as JSON. Raises ClaimLost when the
    study version is not queued (claimed by another worker, done, purged, another version)."""
    if not store.transition_study(study_instance_uid, version, ("queued",), "analyzing"):
        raise ClaimLost(f"study {study_instance_uid} v{version} is {_state_text(store, study_instance_uid)}, not queued")
    claim_id = secrets.token_urlsafe(12)
    write_lease(settings, "analyze", study_instance_uid, version, settings.queue.lease_s, owner=lease_owner_name(worker, claim_id))
    study = store.get_study(study_instance_uid)
    if study is None:  # purged between the claim and now
        raise ClaimLost(f"study {study_instance_uid} is gone")
    report = StudyAnalysis()
    chosen = instances_to_analyse(store, settings, study, report)
    done = {a.sop_instance_uid: a.result_json for a in store.list_analyses(study_instance_uid, version) if a.status == "analyzed" and a.result_json}
    LOG.info("analyze %s v%d: claimed by remote worker %s (%d image(s), %d with a result already)",
             study_instance_uid, version, worker, len(chosen), sum(i.sop_instance_uid in done for i in chosen))  # fmt: skip
    output = settings.output
    return {
        "study_instance_uid": study_instance_uid,
        "version": version,
        "claim_id": claim_id,
        "lease_s": settings.queue.lease_s,
        "tasks": list(settings.model.tasks),
        "kinds": list(kinds_for_study(store, settings, study)),
        "output": {"uid_root": output.uid_root, "institution_name": output.institution_name, "sr_anatomy": output.sr_anatomy},
        "images": [
            {"sop_instance_uid": i.sop_instance_uid, "series_instance_uid": i.series_instance_uid, "result": done.get(i.sop_instance_uid)} for i in chosen
        ],
        "skipped": report.skipped,
    }


def _state_text(store: Store, study_instance_uid: str) -> str:
    study = store.get_study(study_instance_uid)
    return f"{study.state} v{study.version}" if study else "unknown"


def held_study(store: Store, settings: Settings, study_instance_uid: str, version: int, worker: str, claim_id: str) -> StudyRecord:
    """The study version, while this worker's claim holds it; else ClaimLost."""
    study = store.get_study(study_instance_uid)
    if study is None or study.version != version or study.state != "analyzing":
        raise ClaimLost(f"study {study_instance_uid} v{version} is {_state_text(store, study_instance_uid)}: this claim is over")
    if lease_owner(settings, "analyze", study_instance_uid, version) != lease_owner_name(worker, claim_id):
        raise ClaimLost(f"study {study_instance_uid} v{version} is held by another claim (this one's lease ran out)")
    return study


def worker_holds(store: Store, settings: Settings, study_instance_uid: str, worker: str) -> bool:
    """Whether the worker token ``worker`` holds a live claim on the study now (what it may read over DICOMweb)."""
    study = store.get_study(study_instance_uid)
    if study is None or study.state != "analyzing":
        return False
    owner = lease_owner(settings, "analyze", study_instance_uid, study.version) or ""
    return owner.startswith(lease_owner_name(worker, "")) and lease_is_live(settings, "analyze", study_instance_uid, study.version)


def renew_lease(store: Store, settings: Settings, study_instance_uid: str, version: int, worker: str, claim_id: str) -> None:
    held_study(store, settings, study_instance_uid, version, worker, claim_id)
    write_lease(settings, "analyze", study_instance_uid, version, settings.queue.lease_s, owner=lease_owner_name(worker, claim_id))


# ---- results -------------------------------------------------------------------------------------


def record_image_result(store: Store, settings: Settings, study: StudyRecord, sop_instance_uid: str, result_json: str | None, error: str | None) -> None:
    """Record one image's result (or its failure) as a local worker does."""
    from inference.result import AnalysisResult

    instance = next((i for i in store.list_instances(study.study_instance_uid, study.version) if i.sop_instance_uid == sop_instance_uid), None)
    if instance is None:
        raise ResultRejected(f"image {sop_instance_uid} is not in study {study.study_instance_uid} v{study.version}")
    if (result_json is None) == (error is None):
        raise ResultRejected("send either a result or an error")
    result = None
    if result_json is not None:
        try:
            result = AnalysisResult.from_json(result_json)
        except (ValueError, KeyError, TypeError) as exc:
            raise ResultRejected(f"the result of {sop_instance_uid} is not an AnalysisResult: {type(exc).__name__}: {exc}") from None
    if result is None:
        LOG.warning("study %s v%d: an instance failed on a remote worker: %s", study.study_instance_uid, study.version, error)
    record_analysis(store, instance, study.version, result, error)


def expected_objects(store: Store, settings: Settings, study: StudyRecord) -> dict[str, tuple[str, str]]:
    """SOP Instance UID -> (source SOP Instance UID, kind) of every object the recorded results can produce."""
    from inference.result import AnalysisResult
    from sr_writer.kinds import KINDS
    from sr_writer.uids import derive_uid

    expected: dict[str, tuple[str, str]] = {}
    for analysis in store.list_analyses(study.study_instance_uid, study.version):
        if analysis.status != "analyzed" or not analysis.result_json:
            continue
        device_uid = AnalysisResult.from_json(analysis.result_json).model.device_uid
        for kind in KINDS:
            uid = derive_uid(settings.output.uid_root, analysis.sop_instance_uid, device_uid, study.version, kind)
            expected[uid] = (analysis.sop_instance_uid, kind)
    return expected


@dataclass
class StoredObjects:
    """The answer to one STOW-RS request of result objects (PS3.18 Store Instances Response)."""

    referenced: list[tuple[str, str]] = field(default_factory=list)  # (SOP Class UID, SOP Instance UID)
    failed: list[tuple[str, str, int]] = field(default_factory=list)  # (class, instance, FailureReason)

    def response(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.referenced:
            body["00081199"] = {"vr": "SQ", "Value": [_sop_item(c, i) for c, i in self.referenced]}
        if self.failed:
            body["00081198"] = {"vr": "SQ", "Value": [{**_sop_item(c, i), "00081197": {"vr": "US", "Value": [r]}} for c, i, r in self.failed]}
        return body


def _sop_item(sop_class_uid: str, sop_instance_uid: str) -> dict[str, Any]:
    return {"00081150": {"vr": "UI", "Value": [sop_class_uid]}, "00081155": {"vr": "UI", "Value": [sop_instance_uid]}}


def accept_result_object(settings: Settings, store: Store, study: StudyRecord, part: Path, expected: dict[str, tuple[str, str]], into: StoredObjects) -> None:
    """Keep one received result object (a part file) if it is one the node expects; record why not otherwise."""
    try:
        header = pydicom.dcmread(part, stop_before_pixels=True)
        sop_class, sop_uid, study_uid = str(header.SOPClassUID), str(header.SOPInstanceUID), str(header.StudyInstanceUID)
    except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError) as exc:
        LOG.warning("study %s v%d: a remote worker sent a part that is not DICOM (%s)", study.study_instance_uid, study.version, type(exc).__name__)
        into.failed.append(("", "", NOT_EXPECTED))
        return
    if study_uid != study.study_instance_uid:
        into.failed.append((sop_class, sop_uid, UID_MISMATCH))
        return
    if sop_uid not in expected:
        LOG.warning("study %s v%d: a remote worker sent object %s, which no recorded result produces", study.study_instance_uid, study.version, sop_uid)
        into.failed.append((sop_class, sop_uid, NOT_EXPECTED))
        return
    source_uid, kind = expected[sop_uid]
    out_dir = settings.storage.results_dir / study.study_instance_uid / f"v{study.version}"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{kind}-{sop_uid}.dcm"
    try:
        adopt_file(part, path)
    except OSError as exc:
        LOG.error("study %s v%d: result object %s not stored: %s", study.study_instance_uid, study.version, sop_uid, exc)
        into.failed.append((sop_class, sop_uid, PROCESSING_FAILURE))
        return
    store.record_produced_object(
        ProducedObject(study.study_instance_uid, study.version, source_uid, kind, sop_uid, sop_class,
                       str(path.relative_to(settings.storage.results_dir)), datetime.now(UTC))
    )  # fmt: skip
    into.referenced.append((sop_class, sop_uid))


def adopt_file(part: Path, path: Path) -> None:
    """Make the received part file the result file ``path``, durably: fdatasync, then an atomic
    rename (the part lies in the spool's ``.tmp``, normally the same file system), else a copy."""
    with open(part, "rb") as handle:
        os.fdatasync(handle.fileno())
    try:
        os.replace(part, path)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    temp = path.with_suffix(f".{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        shutil.copyfile(part, temp)
        with open(temp, "rb") as handle:
            os.fdatasync(handle.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


# ---- the end of a claim --------------------------------------------------------------------------


def complete_analysis(store: Store, settings: Settings, app: Celery, study: StudyRecord, objects: dict[str, list[str]]) -> str:
    """Finish the study version as a local worker does, once every chosen image has its result and
    every object the worker made (``objects``: source SOP UID -> object UIDs) is stored. Returns the
    outcome (analyzed, failed, nothing); ResultRejected says what is missing."""
    from dicom_node.pipeline.tasks import finish_analysis

    uid, version = study.study_instance_uid, study.version
    report = StudyAnalysis()
    missing: list[str] = []
    for instance in store.list_instances(uid, version):
        if instance.state == "analyzed":
            report.analyzed.append(instance.sop_instance_uid)
        elif instance.state == "failed":
            report.failed[instance.sop_instance_uid] = instance.reason or "failed"
        elif instance.state == "skipped":
            report.skipped[instance.sop_instance_uid] = instance.reason or "skipped"
        elif instance.state == "selected":
            missing.append(f"image {instance.sop_instance_uid} has no result")
    stored = {o.sop_instance_uid for o in store.list_produced_objects(uid, version)}
    missing += [f"object {o} of image {source} is not stored" for source, uids in objects.items() for o in uids if o not in stored]
    if missing:
        raise ResultRejected("; ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))
    report.objects = len(stored)
    entered = study.state_times.get("analyzing") or study.updated_at
    started = time.monotonic() - max(0.0, (datetime.now(UTC) - entered).total_seconds())
    outcome = finish_analysis(store, settings, app, uid, version, report, started)
    clear_lease(settings, "analyze", uid, version)
    return outcome


def fail_analysis(store: Store, settings: Settings, study: StudyRecord, error: str) -> None:
    """The remote worker could not analyse the study (a model or writer error): failed, as a local worker records it."""
    uid, version = study.study_instance_uid, study.version
    LOG.error("analyze %s v%d failed on a remote worker: %s", uid, version, error)
    store.transition_study(uid, version, ("analyzing",), "failed", error=f"analysis failed: {error}")
    audit.record_study_analysed(store, settings, uid, version, "failed", error[:200])
    clear_lease(settings, "analyze", uid, version)
