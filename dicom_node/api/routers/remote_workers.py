"""Analyze workers on other hosts (issue 23): ``/api/worker/...``, for worker tokens only.

A worker with no shared ``data_dir`` and no database claims its study version here, renews the
lease, sends each image's result JSON and the result objects (STOW-RS, multipart/related;
type="application/dicom"), then completes or fails the claim. The logic is in
:mod:`dicom_node.pipeline.remote_work`; the worker's side in :mod:`dicom_node.pipeline.remote_worker`.
It reads the images with WADO-RS from ``/dicomweb``, which a worker token may read.

Every call after the claim names it in ``X-AnatomiX-Claim``; 409 means the claim is over (the lease
ran out and the study was queued again, or it was finished): the worker stops.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from dicom_node.api.deps import Problem, Worker, ctx_of, log
from dicom_node.dicomweb.multipart import MultipartError, MultipartReader, parse_related_content_type, read_parts
from dicom_node.pipeline import remote_work
from dicom_node.pipeline.remote_work import ClaimLost, ResultRejected
from dicom_node.store.base import StudyRecord, WorkerReport

router = APIRouter(tags=["workers"])

Claim = Annotated[str, Header(alias="X-AnatomiX-Claim", min_length=1, max_length=64, description="the claim_id the claim answered")]
DICOM_JSON = "application/dicom+json"


class ImageResult(BaseModel):
    """One image's result: the AnalysisResult JSON, or why the image could not be analysed."""

    result: str | None = Field(None, max_length=8 * 1024 * 1024)
    error: str | None = Field(None, max_length=2000)


class Completion(BaseModel):
    #: Source SOP Instance UID -> the result objects the worker made of it (all must be stored).
    objects: dict[str, list[str]] = Field(default_factory=dict)


class Failure(BaseModel):
    error: str = Field(min_length=1, max_length=2000)


class WorkerReportBody(BaseModel):
    hostname: str = Field(max_length=255)
    pid: int
    queues: list[str]
    model_ok: bool
    model_name: str | None = None
    model_version: str | None = None
    model_digest: str | None = None
    demo_weights: bool | None = None
    device: str | None = None
    load_seconds: float | None = None
    error: str | None = Field(None, max_length=2000)


def _conflict(exc: Exception) -> Problem:
    return Problem(409, "Claim over", str(exc))


def _held(request: Request, uid: str, version: int, who: Any, claim: str) -> StudyRecord:
    ctx = ctx_of(request)
    try:
        return remote_work.held_study(ctx.store, ctx.settings, uid, version, who.user, claim)
    except ClaimLost as exc:
        raise _conflict(exc) from None


@router.get("/api/worker/whoami", summary="the worker token's name (a worker checks its URL and token at start)")
def whoami(who: Worker) -> dict[str, str]:
    return {"name": who.user}


@router.post("/api/worker/analyses/{study_instance_uid}/{version}/claim", summary="claim a queued study version (queued -> analyzing)",
             responses={409: {"description": "the study version is not queued: nothing to do"}})  # fmt: skip
def claim(request: Request, study_instance_uid: str, version: int, who: Worker) -> dict[str, Any]:
    ctx = ctx_of(request)
    try:
        return remote_work.claim_analysis(ctx.store, ctx.settings, study_instance_uid, version, who.user)
    except ClaimLost as exc:
        raise _conflict(exc) from None


@router.put("/api/worker/analyses/{study_instance_uid}/{version}/lease", status_code=204, summary="renew the claim's lease",
            responses={409: {"description": "the claim is over"}})  # fmt: skip
def renew(request: Request, study_instance_uid: str, version: int, who: Worker, claim_id: Claim) -> Response:
    ctx = ctx_of(request)
    try:
        remote_work.renew_lease(ctx.store, ctx.settings, study_instance_uid, version, who.user, claim_id)
    except ClaimLost as exc:
        raise _conflict(exc) from None
    return Response(status_code=204)


@router.put("/api/worker/analyses/{study_instance_uid}/{version}/images/{sop_instance_uid}", status_code=204,
            summary="one image's result (AnalysisResult JSON) or why it failed",
            responses={409: {"description": "the claim is over"}})  # fmt: skip
def image_result(request: Request, study_instance_uid: str, version: int, sop_instance_uid: str, body: ImageResult, who: Worker,
                 claim_id: Claim) -> Response:  # fmt: skip
    study = _held(request, study_instance_uid, version, who, claim_id)
    ctx = ctx_of(request)
    try:
        remote_work.record_image_result(ctx.store, ctx.settings, study, sop_instance_uid, body.result, body.error)
    except ResultRejected as exc:
        raise Problem(422, "Result not recorded", str(exc)) from None
    return Response(status_code=204)


@router.post("/api/worker/analyses/{study_instance_uid}/{version}/studies/{stow_study_instance_uid}",
             summary="STOW-RS of the result objects (multipart/related; type=\"application/dicom\")",
             responses={200: {"content": {DICOM_JSON: {}}, "description": "every object stored"},
                        202: {"description": "some objects were not kept: FailedSOPSequence says which and why"},
                        409: {"description": "the claim is over, or no object was kept"},
                        415: {"description": "not multipart/related; type=\"application/dicom\""}})  # fmt: skip
async def store_result_objects(request: Request, study_instance_uid: str, version: int, stow_study_instance_uid: str, who: Worker,
                               claim_id: Claim) -> JSONResponse:  # fmt: skip
    from starlette.concurrency import run_in_threadpool

    if stow_study_instance_uid != study_instance_uid:
        raise Problem(409, "Study mismatch", f"results of study {study_instance_uid} cannot be stored into study {stow_study_instance_uid}")
    study = await run_in_threadpool(_held, request, study_instance_uid, version, who, claim_id)
    ctx = ctx_of(request)
    try:
        related = parse_related_content_type(request.headers.get("content-type"))
        if related.type not in ("application/dicom", ""):
            raise MultipartError(f'multipart/related of type {related.type!r}: result objects are sent as type="application/dicom"', 415)
        temp_dir = ctx.settings.storage.spool_dir / ".tmp"  # the spool's start-up sweep removes a crash's leftovers
        temp_dir.mkdir(parents=True, exist_ok=True)
        cap = ctx.settings.limits.max_message_bytes
        with MultipartReader(related.boundary, temp_dir, max_part_bytes=cap, max_total_bytes=cap) as reader:
            parts = await read_parts(reader, request.stream())
    except MultipartError as exc:
        log.warning("result objects of study %s v%d from worker %s refused (%d): %s", study_instance_uid, version, who.user, exc.status, exc.reason)
        raise Problem(exc.status, "Result objects not readable", exc.reason) from None
    except ClientDisconnect:
        log.warning("worker %s went away while sending the result objects of study %s v%d; nothing of that request is kept",
                    who.user, study_instance_uid, version)  # fmt: skip
        raise Problem(400, "Body incomplete", "the connection closed before the multipart body ended; nothing was kept") from None
    stored = remote_work.StoredObjects()
    try:
        expected = await run_in_threadpool(remote_work.expected_objects, ctx.store, ctx.settings, study)
        for part in parts:
            await run_in_threadpool(remote_work.accept_result_object, ctx.settings, ctx.store, study, part.path, expected, stored)
    finally:
        for part in parts:
            part.discard()
    status = 200 if not stored.failed else (202 if stored.referenced else 409)
    return JSONResponse(stored.response(), status_code=status, media_type=DICOM_JSON)


@router.post("/api/worker/analyses/{study_instance_uid}/{version}/complete", summary="every image has its result: hand the study to delivery",
             responses={409: {"description": "the claim is over"}, 422: {"description": "a result or an object is missing"}})  # fmt: skip
def complete(request: Request, study_instance_uid: str, version: int, body: Completion, who: Worker, claim_id: Claim) -> dict[str, str]:
    study = _held(request, study_instance_uid, version, who, claim_id)
    ctx = ctx_of(request)
    try:
        outcome = remote_work.complete_analysis(ctx.store, ctx.settings, ctx.celery(), study, body.objects)
    except ResultRejected as exc:
        raise Problem(422, "Analysis incomplete", str(exc)) from None
    return {"outcome": outcome}


@router.post("/api/worker/analyses/{study_instance_uid}/{version}/fail", status_code=204, summary="the study could not be analysed (recorded failed)",
             responses={409: {"description": "the claim is over"}})  # fmt: skip
def fail(request: Request, study_instance_uid: str, version: int, body: Failure, who: Worker, claim_id: Claim) -> Response:
    study = _held(request, study_instance_uid, version, who, claim_id)
    remote_work.fail_analysis(ctx_of(request).store, ctx_of(request).settings, study, body.error)
    return Response(status_code=204)


@router.put("/api/worker/reports/{name:path}", status_code=204, summary="a remote worker process reports itself and its model (/readyz, /api/status)")
def report(request: Request, name: str, body: WorkerReportBody, who: Worker) -> Response:
    store = ctx_of(request).store
    now = datetime.now(UTC)
    known = next((r for r in store.list_worker_reports() if r.name == name), None)
    store.record_worker_report(WorkerReport(name=name, started_at=known.started_at if known else now, last_seen_at=now,
                                            **{**body.model_dump(), "queues": tuple(body.queues)}))  # fmt: skip
    return Response(status_code=204)


@router.delete("/api/worker/reports/{name:path}", status_code=204, summary="a remote worker process stopped cleanly")
def remove_report(request: Request, name: str, who: Worker) -> Response:
    ctx_of(request).store.remove_worker_report(name)
    return Response(status_code=204)
