"""The audit trail: query it (viewer) and export it as JSON lines (admin; the export is itself audited)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from dicom_node.api.deps import AUDIT_EXPORTED, Admin, Viewer, aware, client_host, ctx_of
from dicom_node.audit.trail import Peer
from dicom_node.store.base import Store

router = APIRouter(tags=["audit"])


@router.get("/api/audit", summary="audit events, newest first")
def audit_query(
    request: Request,
    who: Viewer,
    event: Annotated[str | None, Query(max_length=64)] = None,
    since: Annotated[datetime | None, Query()] = None,
    study_instance_uid: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 200,
) -> list[dict[str, Any]]:
    return [_audit_out(e) for e in _audit_rows(ctx_of(request).store, event, aware(since), study_instance_uid, limit)]


@router.get("/api/audit/export", summary="audit events as JSON lines, oldest first (admin; the export is audited)",
            response_class=StreamingResponse, responses={200: {"content": {"application/x-ndjson": {}}}})  # fmt: skip
def audit_export(
    request: Request,
    who: Admin,
    event: Annotated[str | None, Query(max_length=64)] = None,
    since: Annotated[datetime | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1_000_000)] = 100_000,
) -> StreamingResponse:
    ctx = ctx_of(request)
    rows = list(reversed(_audit_rows(ctx.store, event, aware(since), None, limit)))
    ctx.trail.record(AUDIT_EXPORTED, Peer(None, None, client_host(request)), user=who.user, events=len(rows),
                     filter={"event": event, "since": since.isoformat() if since else None})  # fmt: skip

    def lines() -> Iterator[bytes]:
        for row in rows:
            yield (json.dumps(_audit_out(row), sort_keys=True) + "\n").encode()

    return StreamingResponse(lines(), media_type="application/x-ndjson",
                             headers={"Content-Disposition": 'attachment; filename="anatomix-audit.jsonl"'})  # fmt: skip


def _audit_rows(store: Store, event: str | None, since: datetime | None, study: str | None, limit: int) -> list[Any]:
    rows = store.list_audit_events(event, limit=limit if since is None and study is None else max(limit, 100_000))
    rows = [r for r in rows if (since is None or r.at >= since) and (study is None or r.study_instance_uid == study)]
    return rows[:limit]


def _audit_out(e: Any) -> dict[str, Any]:
    return {"id": e.id, "at": e.at.isoformat(), "event": e.event, "calling_ae": e.calling_ae, "called_ae": e.called_ae,
            "peer_host": e.peer_host, "study_instance_uid": e.study_instance_uid, "sop_instance_uid": e.sop_instance_uid,
            "detail": e.detail}  # fmt: skip
