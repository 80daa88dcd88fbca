"""What the operations API's routers share: the request context (:class:`ApiContext`), authentication and
the role checks (``Viewer``, ``Operator``, ``Admin``), the audit of changes, and RFC 9457 problem details
(:class:`Problem`, the error handlers, and the schema's problem responses)."""

from __future__ import annotations

import hmac
import json
import logging
import time
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Annotated, Any, Literal, cast, get_args

from fastapi import Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from dicom_node.api import auth
from dicom_node.api.auth import CSRF_HEADER, SESSION_COOKIE, LoginLimiter, Principal
from dicom_node.audit.trail import AuditTrail, Peer, open_audit_trail
from dicom_node.settings import Settings
from dicom_node.store.base import Store, StoreUnavailable

log = logging.getLogger("dicom_node.api")

PROBLEM_TYPE = "application/problem+json"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
#: Audit events written by the API.
API_LOGIN = "api_login"
API_LOGIN_FAILED = "api_login_failed"
API_LOGIN_RATE_LIMITED = "api_login_rate_limited"
API_CHANGE = "api_change"
AUDIT_EXPORTED = "audit_exported"


class Problem(Exception):
    """An RFC 9457 problem: raised by endpoints, answered as ``application/problem+json``."""

    def __init__(self, status: int, title: str, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.headers, self.extra = status, title, detail, headers or {}, extra


def problem_response(status: int, title: str, detail: str, instance: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, "instance": instance, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_TYPE, headers=headers)


Role = Literal["viewer", "operator", "admin"]


def as_role(value: str) -> Role:
    """A stored account role as the API's ``Role`` (the store only holds these; anything else is a ValueError)."""
    if value not in get_args(Role):
        raise ValueError(f"unknown account role {value!r}")
    return cast(Role, value)


Name = Annotated[str, Path(min_length=1, max_length=64)]


class ProblemModel(BaseModel):
    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None


class ApiContext:
    """What every request shares: settings, the store, the audit trail, the login limiter, Celery."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.trail: AuditTrail = open_audit_trail(store, settings.logging.audit_file)
        self.limiter = LoginLimiter(settings.http.max_failed_logins, settings.http.login_window_s)
        self.started = time.monotonic()
        self._celery: Any = None

    def celery(self) -> Any:
        if self._celery is None:
            from dicom_node.pipeline.queue import create_app

            self._celery = create_app(self.settings)
        return self._celery

    def queue_depths(self) -> dict[str, int | None]:
        from dicom_node.pipeline.queue import QUEUES, queue_depth

        depths: dict[str, int | None] = {}
        for name in QUEUES:
            try:
                depths[name] = queue_depth(self.celery(), name)
            except Exception as exc:  # broker down: the depth is unknown, not an error of this request
                log.debug("queue depth of %s unknown: %s", name, exc)
                depths[name] = None
        return depths


_bearer = HTTPBearer(auto_error=False, description="an API token (axn_...), from POST /api/tokens or `anatomix-node user token`")
_cookie = APIKeyCookie(name=SESSION_COOKIE, auto_error=False, description="console session from POST /api/auth/login (+ X-CSRF-Token)")


def problem_responses_in_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Say in the schema what the API does: every error is ``application/problem+json``, and every
    ``/api`` operation but the login may answer 401 and 403."""
    problem = {PROBLEM_TYPE: {"schema": {"$ref": "#/components/schemas/ProblemModel"}}}
    for path, item in schema.get("paths", {}).items():
        for _method, operation in item.items():
            responses = operation.setdefault("responses", {})
            if path.startswith("/api/") and path != "/api/auth/login":
                responses.setdefault("401", {"description": "no or bad credentials"})
                responses.setdefault("403", {"description": "the account's role is too low, or the CSRF token is missing"})
            if operation.get("parameters") or operation.get("requestBody"):
                responses.setdefault("422", {"description": "invalid request"})
            if operation.get("requestBody"):
                responses.setdefault("400", {"description": "the body is not JSON"})
            for code, response in responses.items():
                if code[0] in "45" and path != "/readyz":
                    response["content"] = problem
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault("ProblemModel", ProblemModel.model_json_schema())
    for unused in ("HTTPValidationError", "ValidationError"):
        if unused not in json.dumps(schema["paths"]):
            schemas.pop(unused, None)
    return schema


def ctx_of(request: Request) -> ApiContext:
    return request.app.state.ctx


def client_host(request: Request) -> str | None:
    return request.client.host if request.client else None


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error as ``application/problem+json``: a Problem, invalid input (422), an HTTP error, the store down (503), a bug (500)."""

    @app.exception_handler(Problem)
    async def on_problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.title, exc.detail, request.url.path, exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"where": ".".join(str(p) for p in e.get("loc", ())), "message": e.get("msg", "")} for e in exc.errors()]
        detail = "; ".join(f"{e['where']}: {e['message']}" for e in errors) or "the request is not valid"
        return problem_response(422, "Invalid request", detail, request.url.path, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.method} {request.url.path} (see /openapi.json)"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        return problem_response(exc.status_code, _title(exc.status_code), detail, request.url.path, getattr(exc, "headers", None))

    @app.exception_handler(StoreUnavailable)
    async def on_store_down(request: Request, exc: StoreUnavailable) -> JSONResponse:
        return problem_response(503, "State store unavailable", str(exc), request.url.path, {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("API %s %s failed", request.method, request.url.path)
        return problem_response(500, "Internal error", f"{type(exc).__name__}: the node logged the details", request.url.path)


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def authenticate(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    cookie: Annotated[str | None, Depends(_cookie)],
) -> Principal:
    ctx = ctx_of(request)
    now = datetime.now(UTC)
    unauthorized = Problem(401, "Unauthorized", "", {"WWW-Authenticate": "Bearer"})
    if bearer is not None and bearer.credentials.startswith(auth.WORKER_TOKEN_PREFIX):
        worker = ctx.store.find_worker_token(auth.secret_hash(bearer.credentials), now)
        if worker is None:
            unauthorized.detail = "the worker token is unknown or revoked"
            raise unauthorized
        return Principal(worker.name, auth.WORKER_ROLE, "token", token_id=worker.id)
    if bearer is not None:
        token = ctx.store.find_api_token(auth.secret_hash(bearer.credentials), now) if bearer.credentials.startswith(auth.TOKEN_PREFIX) else None
        user = ctx.store.get_api_user(token.user_name) if token else None
        if token is None or user is None or user.disabled:
            unauthorized.detail = "the API token is unknown, revoked, or its account is disabled"
            raise unauthorized
        return Principal(user.name, user.role, "token", token_id=token.id)
    if cookie:
        session = ctx.store.get_api_session(auth.secret_hash(cookie), now)
        user = ctx.store.get_api_user(session.user_name) if session else None
        if session is None or user is None or user.disabled:
            unauthorized.detail = "the session has expired or ended: log in again (POST /api/auth/login)"
            raise unauthorized
        if request.method not in SAFE_METHODS:
            sent = request.headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(sent.encode(), session.csrf_token.encode()):
                raise Problem(403, "CSRF token missing or wrong",
                              f"a state-changing request with a session cookie must send the session's CSRF token in {CSRF_HEADER}")  # fmt: skip
        return Principal(user.name, user.role, "session", session_hash=session.id_hash, csrf_token=session.csrf_token,
                         must_change_password=user.must_change_password)  # fmt: skip
    unauthorized.detail = "authentication required: an API token (Authorization: Bearer ...) or a session cookie (POST /api/auth/login)"
    raise unauthorized


#: What a session logged in with a one-time password may do before it changes the password.
PASSWORD_CHANGE_HINT = "change your one-time password first: POST /api/auth/password (the console opens its password page)"


#: What a worker token may read besides the worker endpoints: the DICOMweb routes of a study it has claimed.
WORKER_READABLE_PREFIX = "/dicomweb/studies/"


def worker_may_read(request: Request, principal: Principal) -> bool:
    """A worker token reads only ``/dicomweb/studies/{uid}/...`` of a study whose live claim it holds
    (no search over the node's studies, no other study)."""
    from dicom_node.pipeline.remote_work import worker_holds

    path = request.url.path
    if not path.startswith(WORKER_READABLE_PREFIX):
        return False
    study_instance_uid = path[len(WORKER_READABLE_PREFIX) :].split("/", 1)[0]
    ctx = ctx_of(request)
    return bool(study_instance_uid) and worker_holds(ctx.store, ctx.settings, study_instance_uid, principal.user)


def role(needed: str) -> Any:
    def check(request: Request, principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if principal.role == auth.WORKER_ROLE:
            if needed == "viewer" and request.method in SAFE_METHODS and worker_may_read(request, principal):
                return principal
            raise Problem(403, "Forbidden", f"a worker token ({principal.user}) may only read over DICOMweb the study it has claimed, "
                                            "and report analyses")  # fmt: skip
        if principal.must_change_password:
            raise Problem(403, "Password change required", f"{principal.user} logged in with a one-time password: {PASSWORD_CHANGE_HINT}")
        if not auth.role_at_least(principal.role, needed):
            raise Problem(403, "Forbidden", f"this needs the {needed} role; {principal.user} is {principal.role}")
        return principal

    return Depends(check)


def any_account(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
    if principal.role == auth.WORKER_ROLE:
        raise Problem(403, "Forbidden", f"a worker token ({principal.user}) may only read over DICOMweb the study it has claimed, and report analyses")
    return principal


#: Any account, also one that must still change its one-time password (its own password, who am I, log out).
Account = Annotated[Principal, Depends(any_account)]
Viewer = Annotated[Principal, role("viewer")]
Operator = Annotated[Principal, role("operator")]
Admin = Annotated[Principal, role("admin")]


def worker_only(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
    """The worker endpoints (``/api/worker``) take worker tokens only, never an account."""
    if principal.role != auth.WORKER_ROLE:
        raise Problem(403, "Forbidden", f"this needs a worker token (anatomix-node worker-token add NAME); {principal.user} is an account")
    return principal


#: An analyze worker on another host, authenticated by its worker token.
Worker = Annotated[Principal, Depends(worker_only)]


def audit_change(request: Request, who: Principal, action: str, target: str, before: Any = None, after: Any = None, **extra: Any) -> None:
    """Who changed what, with the values before and after (never a secret)."""
    ctx_of(request).trail.record(API_CHANGE, Peer(None, None, client_host(request)), user=who.user, via=who.via, action=action,
                                 target=target, before=before, after=after, **extra)  # fmt: skip


def aware(value: datetime | None) -> datetime | None:
    """A query's date-time in UTC (a naive one is taken as UTC)."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
