"""Studies: the list and one study, dead letters, and resend and reanalysis of one study or of a selection."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Path, Query, Request
from pydantic import BaseModel, Field

from dicom_node.api.auth import Principal
from dicom_node.api.deps import ApiContext, Operator, Problem, ProblemModel, Viewer, audit_change, aware, ctx_of
from dicom_node.ops.errors import UserError
from dicom_node.ops.studies import ACTIONABLE_STATES
from dicom_node.store.base import STUDY_STATES, RemoteNode, Store

router = APIRouter(tags=["studies"])


class ResendIn(BaseModel):
    destination: str | None = Field(default=None, max_length=64, description="default: the study's usual destinations")


class ReanalyzeIn(BaseModel):
    new_version: bool = Field(default=False, description="also a study that has results: analysed again as a new version")


class BulkSelect(BaseModel):
    states: list[Literal[ACTIONABLE_STATES]] = Field(default_factory=list, max_length=len(ACTIONABLE_STATES))  # type: ignore[valid-type]
    since: datetime | None = None


class BulkResendIn(BulkSelect):
    undelivered: bool = False
    destination: str | None = Field(default=None, max_length=64)


class BulkReanalyzeIn(BulkSelect):
    new_version: bool = False


class ActionOut(BaseModel):
    study_instance_uid: str
    ok: bool
    message: str
    version: int | None = None


class BulkOut(BaseModel):
    matched: int
    results: list[ActionOut]


@router.get("/api/studies", summary="studies, newest first: state, counts, skip reasons, stage timings, deliveries")
def list_studies(
    request: Request,
    who: Viewer,
    state: Annotated[list[Literal[STUDY_STATES]] | None, Query(description="repeatable")] = None,  # type: ignore[valid-type]
    source: Annotated[str | None, Query(max_length=64, description="calling AE title or remote node name")] = None,
    since: Annotated[datetime | None, Query(description="last instance received at or after (ISO 8601)")] = None,
    until: Annotated[datetime | None, Query(description="last instance received before (ISO 8601)")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    from dicom_node.ops.studies import delivery_summary, study_summary

    ctx = ctx_of(request)
    since, until = aware(since), aware(until)
    now = datetime.now(UTC)
    chosen = []
    for study in ctx.store.list_studies(tuple(state) if state else None, limit=100_000):
        if source and source not in (study.source_ae, study.source_node):
            continue
        if (since and study.last_received_at < since) or (until and study.last_received_at >= until):
            continue
        chosen.append(study)
        if len(chosen) >= limit:
            break
    out = []
    for study in chosen:
        summary = study_summary(study, ctx.store, now)
        summary["source_node"] = study.source_node
        summary["deliveries"] = delivery_summary(ctx.store, ctx.settings, study)
        out.append(summary)
    return out


@router.get("/api/studies/{study_instance_uid}", summary="one study: stages, instances, skip reasons, result objects, deliveries",
            responses={404: {"model": ProblemModel}})  # fmt: skip
def get_study(request: Request, who: Viewer, study_instance_uid: Annotated[str, Path(min_length=1, max_length=64)]) -> dict[str, Any]:
    from dicom_node.ops.studies import delivery_summary, study_summary

    ctx = ctx_of(request)
    study = _require_study(ctx.store, study_instance_uid)
    summary = study_summary(study, ctx.store, datetime.now(UTC))
    summary["source_node"] = study.source_node
    summary["source_host"] = study.source_host
    summary["deliveries"] = delivery_summary(ctx.store, ctx.settings, study)
    summary["instances"] = [
        {"sop_instance_uid": i.sop_instance_uid, "sop_class_uid": i.sop_class_uid, "series_instance_uid": i.series_instance_uid,
         "state": i.state, "reason": i.reason, "version": i.study_version, "size": i.size, "calling_ae": i.calling_ae,
         "received_at": i.received_at.isoformat()}
        for i in ctx.store.list_instances(study.study_instance_uid)
    ]  # fmt: skip
    summary["result_objects"] = [
        {"kind": o.kind, "sop_instance_uid": o.sop_instance_uid, "sop_class_uid": o.sop_class_uid, "version": o.study_version,
         "source_sop_instance_uid": o.source_sop_instance_uid, "created_at": o.created_at.isoformat()}
        for o in ctx.store.list_produced_objects(study.study_instance_uid)
    ]  # fmt: skip
    summary["delivery_objects"] = [_delivery_out(d) for d in ctx.store.list_deliveries(study.study_instance_uid)]
    return summary


@router.get("/api/dead-letters", summary="result objects a destination did not get (failed or dead-lettered)")
def dead_letters(request: Request, who: Viewer, destination: Annotated[str | None, Query(max_length=64)] = None) -> list[dict[str, Any]]:
    store = ctx_of(request).store
    rows = store.list_deliveries(statuses=("failed", "dead"))
    return [_delivery_out(d) for d in rows if destination in (None, d.destination)]


@router.post("/api/studies/{study_instance_uid}/resend", summary="send a study's results again (operator)",
             responses={404: {"model": ProblemModel}, 409: {"model": ProblemModel}})  # fmt: skip
def resend_one(request: Request, who: Operator, study_instance_uid: Annotated[str, Path(min_length=1, max_length=64)],
               body: Annotated[ResendIn | None, Body()] = None) -> ActionOut:  # fmt: skip
    ctx = ctx_of(request)
    study = _require_study(ctx.store, study_instance_uid)
    target = _destination(ctx.store, body.destination if body else None)
    result = _resend(ctx, who, study, target, bulk=False)
    audit_change(request, who, "study_resend", study_instance_uid, destination=target.name if target else None, ok=result.ok,
                 message=result.message)  # fmt: skip
    if not result.ok and result.message.startswith("refused: "):
        raise Problem(409, "Cannot resend", result.message.removeprefix("refused: "))
    return result


@router.post("/api/resend", summary="send the results of many studies again (operator)")
def resend_bulk(request: Request, who: Operator, body: BulkResendIn) -> BulkOut:
    from dicom_node.ops.studies import select_studies

    ctx = ctx_of(request)
    target = _destination(ctx.store, body.destination)
    try:
        studies = select_studies(ctx.store, None, list(body.states) or None, aware(body.since), body.undelivered)
    except UserError as exc:
        raise Problem(422, "Invalid request", str(exc)) from None
    results = [_resend(ctx, who, s, target, bulk=True) for s in studies]
    audit_change(request, who, "bulk_resend", f"{len(studies)} studies", selection=body.model_dump(mode="json"),
                 ok=sum(r.ok for r in results))  # fmt: skip
    return BulkOut(matched=len(studies), results=results)


@router.post("/api/studies/{study_instance_uid}/reanalyze", summary="analyse a study again (operator)",
             responses={404: {"model": ProblemModel}, 409: {"model": ProblemModel}})  # fmt: skip
def reanalyze_one(request: Request, who: Operator, study_instance_uid: Annotated[str, Path(min_length=1, max_length=64)],
                  body: Annotated[ReanalyzeIn | None, Body()] = None) -> ActionOut:  # fmt: skip
    ctx = ctx_of(request)
    _require_model(ctx)
    study = _require_study(ctx.store, study_instance_uid)
    result = _reanalyze(ctx, who, study, bool(body and body.new_version))
    audit_change(request, who, "study_reanalyze", study_instance_uid, ok=result.ok, message=result.message, version=result.version)
    if not result.ok:
        raise Problem(409, "Cannot reanalyse", result.message)
    return result


@router.post("/api/reanalyze", summary="analyse many studies again (operator)", responses={409: {"model": ProblemModel}})
def reanalyze_bulk(request: Request, who: Operator, body: BulkReanalyzeIn) -> BulkOut:
    from dicom_node.ops.studies import select_studies

    ctx = ctx_of(request)
    _require_model(ctx)
    try:
        studies = select_studies(ctx.store, None, list(body.states) or None, aware(body.since))
    except UserError as exc:
        raise Problem(422, "Invalid request", str(exc)) from None
    results = [_reanalyze(ctx, who, s, body.new_version) for s in studies]
    audit_change(request, who, "bulk_reanalyze", f"{len(studies)} studies", selection=body.model_dump(mode="json"),
                 ok=sum(r.ok for r in results))  # fmt: skip
    return BulkOut(matched=len(studies), results=results)


def _require_study(store: Store, uid: str) -> Any:
    study = store.get_study(uid)
    if study is None:
        raise Problem(404, "No such study", f"no study {uid} in the state store")
    return study


def _destination(store: Store, name: str | None) -> RemoteNode | None:
    if name is None:
        return None
    node = store.get_remote_node(name)
    if node is None or not node.is_destination:
        raise Problem(422, "Invalid request", f"destination: {name!r} is not a configured destination (GET /api/nodes)")
    return node


def _require_model(ctx: ApiContext) -> None:
    from dicom_node.pipeline.dispatch import NO_MODEL_ERROR, model_configured

    if not model_configured(ctx.settings):
        raise Problem(409, "No model", f"nothing can be analysed: {NO_MODEL_ERROR}")


def _resend(ctx: ApiContext, who: Principal, study: Any, target: RemoteNode | None, bulk: bool) -> ActionOut:
    """The shared resend (as ``anatomix-node resend``); a refusal is ``ok=False``, ``refused: ...``."""
    from dicom_node.ops.studies import resend_study

    try:
        result = resend_study(ctx.store, ctx.settings, ctx.celery(), ctx.trail, study, target, bulk=bulk, user=who.user, via=who.via)
    except UserError as exc:
        return ActionOut(study_instance_uid=study.study_instance_uid, ok=False, message=f"refused: {exc}")
    return ActionOut(study_instance_uid=result.study_instance_uid, ok=result.ok, message=result.message, version=result.version)


def _reanalyze(ctx: ApiContext, who: Principal, study: Any, new_version: bool) -> ActionOut:
    """The shared reanalysis (as ``anatomix-node reanalyze``) of one study."""
    from dicom_node.ops.studies import reanalyze_study

    result = reanalyze_study(ctx.store, ctx.celery(), ctx.trail, study, new_version=new_version, user=who.user, via=who.via)
    return ActionOut(study_instance_uid=result.study_instance_uid, ok=result.ok, message=result.message, version=result.version)


def _delivery_out(d: Any) -> dict[str, Any]:
    return {
        "study_instance_uid": d.study_instance_uid, "version": d.study_version, "destination": d.destination,
        "sop_instance_uid": d.sop_instance_uid, "status": d.status, "attempts": d.attempts,
        "last_status": None if d.last_status is None else f"0x{d.last_status:04X}", "error": d.error,
        "updated_at": d.updated_at.isoformat(), "first_attempt_at": d.first_attempt_at.isoformat() if d.first_attempt_at else None,
        "next_attempt_at": d.next_attempt_at.isoformat() if d.next_attempt_at else None,
    }  # fmt: skip
