"""Health and metrics, without an account: ``/healthz`` (alive), ``/readyz`` (ready to work) and ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from dicom_node.api.deps import Problem, ctx_of, log
from dicom_node.ops.node_status import readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="the HTTP process is alive")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="ready to work: store, broker, spool disk, and a worker with a usable model",
            responses={503: {"description": "not ready: the failing checks say why"}})  # fmt: skip
def readyz(request: Request) -> JSONResponse:
    ctx = ctx_of(request)
    checks = readiness(ctx.settings, ctx.store, ctx.celery)
    ready = all(c["ok"] for c in checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics (anatomix_*)", response_class=PlainTextResponse,
            description="Open, unless `http.metrics_token_file` is set: then `Authorization: Bearer <the file's token>` is needed.",
            responses={401: {"description": "a metrics token is configured and was not sent, or is wrong"},
                       503: {"description": "the metrics token file cannot be read"}})  # fmt: skip
def metrics(request: Request) -> Response:
    from dicom_node.api.metrics import MetricsTokenUnreadable, metrics_token_matches, render

    ctx = ctx_of(request)
    try:
        allowed = metrics_token_matches(ctx.settings, request.headers.get("authorization"))
    except MetricsTokenUnreadable as exc:
        log.error("/metrics refused: %s", exc)
        raise Problem(503, "Metrics token unreadable", str(exc)) from None
    if not allowed:
        raise Problem(401, "Unauthorized", "/metrics needs the metrics token: Authorization: Bearer <token from http.metrics_token_file>",
                      {"WWW-Authenticate": "Bearer"})  # fmt: skip
    body, content_type = render(ctx.settings, ctx.store, ctx.queue_depths)
    return Response(body, media_type=content_type)
