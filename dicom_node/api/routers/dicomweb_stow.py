"""STOW-RS receive (``POST /dicomweb/studies[/{study}]``) and the tokens bound to source nodes.

The body is streamed (:mod:`dicom_node.dicomweb.multipart`) into the spool's ``.tmp``: a body over
``http.stow_max_request_bytes`` is refused as soon as it is known (the Content-Length, else the
running count), an instance over ``limits.max_message_bytes`` likewise, and a malformed or truncated
body keeps nothing. The parts then go through the C-STORE rules (:mod:`dicom_node.dicomweb.stow`)
in a worker thread, so fsync and the database never block the event loop.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Annotated, Any, NoReturn

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from dicom_node.api.deps import Admin, Name, Problem, ProblemModel, audit_change, client_host, ctx_of
from dicom_node.audit.trail import Peer
from dicom_node.dicomweb.multipart import MultipartError, MultipartReader, parse_related_content_type, read_parts
from dicom_node.dicomweb.stow import DICOM_MEDIA_TYPE, STOW_REQUEST, StowReceiver
from dicom_node.ops.source_tokens import SourceTokenRefused, create_source_token, source_for_token
from dicom_node.store.base import RemoteNode, SourceToken
from dicom_node.store.spool import SpoolFull, check_free_space, is_valid_uid, temp_dir

log = logging.getLogger("dicom_node.api")
router = APIRouter(tags=["dicomweb"])

DICOM_JSON = "application/dicom+json"
_bearer = HTTPBearer(auto_error=False, description="a source token (axs_...): `anatomix-node ae token add NODE` or POST /api/nodes/{name}/tokens")
#: At most this many Warning headers (one per failed instance) in one answer.
MAX_WARNINGS = 20


def stow_source(request: Request, bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> RemoteNode:
    """The source node the request's token is bound to (401 otherwise)."""
    if bearer is None:
        why = "STOW-RS needs a source token: Authorization: Bearer axs_... (anatomix-node ae token add NODE)"
    else:
        node, why = source_for_token(ctx_of(request).store, bearer.credentials)
        if node is not None:
            return node
    log.warning("STOW-RS from %s refused: %s", client_host(request), why)
    # Connection: close on every refusal before the body is read, so the body is not read (and drained) at all.
    raise Problem(401, "Unauthorized", why, {"WWW-Authenticate": "Bearer", "Connection": "close"})


Source = Annotated[RemoteNode, Depends(stow_source)]
StudyUid = Annotated[str, Path(min_length=1, max_length=64, description="Study Instance UID")]
_PROBLEMS = {
    400: "malformed or truncated multipart body (nothing kept)",
    401: "no, unknown or revoked source token",
    406: f"the Accept header allows no {DICOM_JSON}",
    413: "over http.stow_max_request_bytes or an instance over limits.max_message_bytes (nothing kept)",
    415: 'not multipart/related; type="application/dicom"',
    503: "nothing stored for want of resources (spool below its watermark, state store down): retry later",
}
_STOW_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {"description": "some instances stored; FailedSOPSequence names the others with a FailureReason"},
    409: {"description": "no instance stored; FailedSOPSequence names each with a FailureReason"},
}
_STOW_RESPONSES.update({code: {"model": ProblemModel, "description": text} for code, text in _PROBLEMS.items()})


@router.post("/dicomweb/studies", summary="STOW-RS: store instances (source token)", responses=_STOW_RESPONSES)
async def store_instances(request: Request, source: Source) -> Response:
    return await _stow(request, source, None)


@router.post("/dicomweb/studies/{study}", summary="STOW-RS: store instances of one study (source token)", responses=_STOW_RESPONSES)
async def store_study_instances(request: Request, source: Source, study: StudyUid) -> Response:
    if not is_valid_uid(study):
        raise Problem(400, "Bad Request", "the study in the URL is not a valid UID (digits and dots, at most 64 characters)", {"Connection": "close"})
    return await _stow(request, source, study)


def _receiver(request: Request) -> StowReceiver:
    receiver = getattr(request.app.state, "stow_receiver", None)
    if receiver is None:
        ctx = ctx_of(request)
        from dicom_node.pipeline.assembly import close_studies_at_release

        receiver = StowReceiver(ctx.settings, ctx.store, ctx.trail,
                                on_request_end=lambda src, uids: close_studies_at_release(ctx.store, ctx.settings, src, uids, ctx.trail))  # fmt: skip
        request.app.state.stow_receiver = receiver
    return receiver


def _accepts_dicom_json(accept: str) -> bool:
    types = {item.split(";", 1)[0].strip().lower() for item in accept.split(",")} if accept else {"*/*"}
    return bool(types & {DICOM_JSON, "application/json", "application/*", "*/*"})


async def _stow(request: Request, source: RemoteNode, study: str | None) -> Response:
    ctx = ctx_of(request)
    settings = ctx.settings
    host = client_host(request)
    if not _accepts_dicom_json(request.headers.get("accept", "")):
        raise Problem(406, "Not Acceptable", f"the node answers STOW-RS in {DICOM_JSON}; the Accept header allows none", {"Connection": "close"})
    try:
        related = parse_related_content_type(request.headers.get("content-type"))
        if related.type not in ("", DICOM_MEDIA_TYPE):
            raise MultipartError(f'multipart/related of type {related.type!r}: the node stores type="{DICOM_MEDIA_TYPE}" only', 415)
        declared = int(request.headers.get("content-length") or 0)
        if declared > settings.http.stow_max_request_bytes:
            raise MultipartError(
                f"the request declares {declared} bytes, over http.stow_max_request_bytes = {settings.http.stow_max_request_bytes}: "
                "send the study in several requests",
                413,
            )
    except MultipartError as exc:
        _refused(request, source, exc.status, exc.reason)
    except ValueError:
        _refused(request, source, 400, "the Content-Length header is not a number")
    spool = settings.storage.spool_dir
    try:
        check_free_space(spool, settings.storage.min_free_bytes, declared)
    except SpoolFull as exc:
        log.error("STOW-RS from %s answered 503: %s", source.name, exc)
        raise Problem(
            503, "Service Unavailable", "the node's spool is below its free-space watermark: retry later", {"Retry-After": "60", "Connection": "close"}
        ) from None
    reader = MultipartReader(related.boundary, temp_dir(spool), max_part_bytes=settings.limits.max_message_bytes,
                             max_total_bytes=settings.http.stow_max_request_bytes)  # fmt: skip
    try:
        with reader:
            parts = await read_parts(reader, request.stream())
    except MultipartError as exc:
        _refused(request, source, exc.status, exc.reason)
    except ClientDisconnect:
        log.warning("STOW-RS from %s (%s): the client went away after %d bytes; nothing kept", source.name, host, reader.total_bytes)
        return Response(status_code=400)
    except OSError as exc:  # the spool's disk filled up (or failed) while the body was written: nothing kept
        log.error("STOW-RS from %s answered 503: writing the body to %s failed: %s", source.name, temp_dir(spool), exc)
        raise Problem(
            503,
            "Service Unavailable",
            f"the node could not write the request to its spool ({exc.strerror or exc}): retry later",
            {"Retry-After": "60", "Connection": "close"},
        ) from None
    result = await run_in_threadpool(_receiver(request).store_parts, source, host, parts, study)
    base = str(request.base_url).rstrip("/") + "/dicomweb"
    failures = [o for o in result.outcomes if not o.stored]
    headers = {}
    if failures:
        # A human-readable reason per failed instance (RFC 7234 Warning, as PS3.18 suggests); never patient data.
        text = "; ".join(f"{o.sop_instance_uid or 'part'}: 0x{o.status:04X} {o.reason}" for o in failures[:MAX_WARNINGS])
        headers["Warning"] = '299 anatomix-node "' + text.replace('"', "'").encode("ascii", "replace").decode()[:4000] + '"'
    if result.http_status == 503:
        headers["Retry-After"] = "30"
    return JSONResponse(result.response(base, study).to_json_dict(), status_code=result.http_status, media_type=DICOM_JSON, headers=headers)


def _refused(request: Request, source: RemoteNode, status: int, reason: str) -> NoReturn:
    """A request refused as a whole (nothing kept): logged, audited with the source, answered as a problem."""
    log.warning("STOW-RS from %s (%s) refused with %d: %s", source.name, client_host(request), status, reason)
    ctx_of(request).trail.record(STOW_REQUEST, Peer(source.ae_title, None, client_host(request)), source=source.name, received=0,
                                 refused_request=status, reason=reason)  # fmt: skip
    titles = {400: "Bad Request", 413: "Content Too Large", 415: "Unsupported Media Type"}
    # Connection: close, so that the server stops reading (and the sender stops sending) the rest of the body.
    raise Problem(status, titles.get(status, "Bad Request"), reason, {"Connection": "close"})


# ---- tokens bound to source nodes -------------------------------------------------------------


class SourceTokenIn(BaseModel):
    label: str = Field(min_length=1, max_length=100)


class SourceTokenOut(BaseModel):
    id: int
    node: str
    label: str
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


class SourceTokenCreated(SourceTokenOut):
    token: str = Field(description="the secret (axs_...), shown only in this answer")


def _token_out(token: SourceToken) -> SourceTokenOut:
    return SourceTokenOut(id=token.id, node=token.node_name, label=token.label, created_at=token.created_at,
                          last_used_at=token.last_used_at, revoked_at=token.revoked_at)  # fmt: skip


@router.get("/api/nodes/{name}/tokens", summary="the source tokens of a node (admin)", responses={404: {"model": ProblemModel}})
def list_source_tokens(request: Request, who: Admin, name: Name) -> list[SourceTokenOut]:
    store = ctx_of(request).store
    if store.get_remote_node(name) is None:
        raise Problem(404, "No such node", f"no remote node named {name!r}")
    return [_token_out(t) for t in store.list_source_tokens(name)]


@router.post("/api/nodes/{name}/tokens", status_code=201, summary="a token bound to this source node, for STOW-RS (admin; the secret is shown once)",
             responses={404: {"model": ProblemModel}, 409: {"model": ProblemModel}})  # fmt: skip
def add_source_token(request: Request, who: Admin, name: Name, body: SourceTokenIn) -> SourceTokenCreated:
    store = ctx_of(request).store
    if store.get_remote_node(name) is None:
        raise Problem(404, "No such node", f"no remote node named {name!r}")
    try:
        secret, token = create_source_token(store, name, body.label)
    except SourceTokenRefused as exc:
        raise Problem(409, "Not a source", str(exc)) from None
    audit_change(request, who, "source_token_created", name, after={"id": token.id, "label": token.label})
    return SourceTokenCreated(**_token_out(token).model_dump(), token=secret)


@router.delete("/api/nodes/{name}/tokens/{token_id}", status_code=204, summary="revoke a source token (admin)", responses={404: {"model": ProblemModel}})
def revoke_source_token(request: Request, who: Admin, name: Name, token_id: Annotated[int, Path(ge=1, le=2**62)]) -> Response:
    store = ctx_of(request).store
    token = next((t for t in store.list_source_tokens(name) if t.id == token_id and t.revoked_at is None), None)
    if token is None or not store.revoke_source_token(token_id, datetime.now(UTC)):
        raise Problem(404, "No such token", f"node {name} has no unrevoked source token {token_id}")
    audit_change(request, who, "source_token_revoked", name, before={"id": token.id, "label": token.label})
    return Response(status_code=204)
