"""The operations API: FastAPI application over the state store (OpenAPI at ``/openapi.json``).

Everything under ``/api`` needs an account: an API token (``Authorization: Bearer axn_...``) or a
console session cookie (``POST /api/auth/login``; state-changing requests must then echo the
session's CSRF token in ``X-CSRF-Token``). ``/healthz`` and ``/readyz`` answer without, and so does
``/metrics`` unless ``http.metrics_token_file`` is set (then it needs that token as a Bearer token).
Roles: ``viewer`` reads, ``operator`` also echoes, resends and reanalyses, ``admin`` also changes remote nodes and accounts. Errors are RFC 9457 problem details
(``application/problem+json``) whose ``detail`` says what was wrong.

The endpoints call the same functions as the CLI and the console (:mod:`dicom_node.ops`: node
validation, echo, the ``studies`` view, study selection, resend, reanalysis), so all behave alike.
"""

from __future__ import annotations

import hmac
import json
import logging
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import Body, Depends, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from dicom_node.api import auth
from dicom_node.api.auth import CSRF_HEADER, SESSION_COOKIE, LoginLimiter, Principal
from dicom_node.audit.trail import AuditTrail, Peer, open_audit_trail
from dicom_node.ops.errors import UserError
from dicom_node.ops.studies import ACTIONABLE_STATES
from dicom_node.settings import Settings
from dicom_node.store.base import STUDY_STATES, RemoteNode, Store, StoreConflict, StoreError, StoreUnavailable

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


# ---- request and response models ------------------------------------------------------------------

Role = Literal["viewer", "operator", "admin"]
NodeRole = Literal["source", "destination", "both"]
Name = Annotated[str, Path(min_length=1, max_length=64)]


#: A host name (labels of 1-63 letters, digits, '-', '_'), an IPv4/IPv6 literal, or '*' (any host, sources only).
HOST_PATTERN = (
    r"^(\*|[0-9]{1,3}(\.[0-9]{1,3}){3}|[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*"
    r"|([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?)$"
)
#: Printable ASCII without backslash, not only spaces (the settings' validate_ae_title checks the rest).
AE_TITLE_PATTERN = r"^[ -\[\]-~]*[!-\[\]-~][ -\[\]-~]*$"


class ProblemModel(BaseModel):
    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None


class LoginIn(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class LoginOut(BaseModel):
    user: str
    role: Role
    csrf_token: str
    expires_at: datetime


class MeOut(BaseModel):
    user: str
    role: Role
    via: Literal["token", "session"]


class TokenIn(BaseModel):
    label: str = Field(min_length=1, max_length=100)


class TokenOut(BaseModel):
    id: int
    user: str
    label: str
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


class TokenCreated(TokenOut):
    token: str = Field(description="the secret: shown only in this answer, store it now")


class UserIn(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
    role: Role
    password: str | None = Field(default=None, min_length=12, max_length=1024, description="omit to get a generated one-time password")


class UserPatch(BaseModel):
    role: Role | None = None
    disabled: bool | None = None
    reset_password: bool = Field(default=False, description="replace the password with a generated one, shown once")


class UserOut(BaseModel):
    name: str
    role: Role
    disabled: bool
    created_at: datetime
    password_changed_at: datetime
    password: str | None = Field(default=None, description="a generated password, shown only in this answer")


class NodeIn(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    ae_title: str = Field(min_length=1, max_length=16, pattern=AE_TITLE_PATTERN)
    host: str = Field(min_length=1, max_length=253, pattern=HOST_PATTERN)
    port: int = Field(ge=1, le=65535)
    role: NodeRole
    profile: str | None = Field(default=None, max_length=64, description="an output profile (GET /api/profiles); default: output.default_profile")
    quiet_period_s: float | None = Field(default=None, ge=0, le=86400)
    complete_on_release: bool = False
    default_destination: bool = False
    tls_client_certificate: Literal["optional", "required"] | None = Field(
        default=None, description="as a source: required = its associations are refused unless it presents a trusted client "
        "certificate on the DICOM TLS port (default optional: the port's own rule)")  # fmt: skip


class NodePatch(BaseModel):
    ae_title: str | None = Field(default=None, min_length=1, max_length=16, pattern=AE_TITLE_PATTERN)
    host: str | None = Field(default=None, min_length=1, max_length=253, pattern=HOST_PATTERN)
    port: int | None = Field(default=None, ge=1, le=65535)
    role: NodeRole | None = None
    profile: str | None = Field(default=None, max_length=64)
    quiet_period_s: float | None = Field(default=None, ge=0, le=86400)
    complete_on_release: bool | None = None
    default_destination: bool | None = None
    tls_client_certificate: Literal["optional", "required"] | None = Field(
        default=None, description="as a source: required = its associations are refused unless it presents a trusted client "
        "certificate on the DICOM TLS port (default optional: the port's own rule)")  # fmt: skip


class NodeOut(BaseModel):
    name: str
    ae_title: str
    host: str
    port: int
    role: NodeRole
    profile: str
    quiet_period_s: float | None
    complete_on_release: bool
    default_destination: bool
    tls: bool
    tls_verify_peer: bool = Field(description="as SCU over TLS: its certificate chain is verified")
    tls_check_hostname: bool = Field(description="as SCU over TLS: its certificate must name its host")
    tls_client_certificate: Literal["optional", "required"]


class EchoIn(BaseModel):
    timeout_s: float | None = Field(default=None, gt=0, le=60)


class EchoOut(BaseModel):
    node: str
    success: bool
    rtt_ms: float | None
    error: str | None


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


# ---- the application --------------------------------------------------------------------------------


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


def create_app(settings: Settings, store: Store) -> FastAPI:
    app = FastAPI(
        title="AnatomiX Node operations API",
        version="1",
        description=__doc__,
        # No /docs or /redoc: they load their JavaScript from a CDN, which hospital networks block.
        docs_url=None,
        redoc_url=None,
    )
    app.state.ctx = ApiContext(settings, store)
    _install_error_handlers(app)
    _routes(app)
    from dicom_node.api.rules import router as routing_rules  # imports this module's role checks

    app.include_router(routing_rules)
    from dicom_node.api.profiles import router as profiles

    app.include_router(profiles)
    from dicom_node.console import mount  # the web console (/console), built on this API

    mount(app)
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = problem_responses_in_schema(original())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


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


def _install_error_handlers(app: FastAPI) -> None:
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
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


# ---- authentication ------------------------------------------------------------------------------


def authenticate(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    cookie: Annotated[str | None, Depends(_cookie)],
) -> Principal:
    ctx = ctx_of(request)
    now = datetime.now(UTC)
    unauthorized = Problem(401, "Unauthorized", "", {"WWW-Authenticate": "Bearer"})
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
        return Principal(user.name, user.role, "session", session_hash=session.id_hash, csrf_token=session.csrf_token)
    unauthorized.detail = "authentication required: an API token (Authorization: Bearer ...) or a session cookie (POST /api/auth/login)"
    raise unauthorized


def role(needed: str) -> Any:
    def check(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if not auth.role_at_least(principal.role, needed):
            raise Problem(403, "Forbidden", f"this needs the {needed} role; {principal.user} is {principal.role}")
        return principal

    return Depends(check)


Viewer = Annotated[Principal, role("viewer")]
Operator = Annotated[Principal, role("operator")]
Admin = Annotated[Principal, role("admin")]


def audit_change(request: Request, who: Principal, action: str, target: str, before: Any = None, after: Any = None, **extra: Any) -> None:
    """Who changed what, with the values before and after (never a secret)."""
    ctx_of(request).trail.record(API_CHANGE, Peer(None, None, client_host(request)), user=who.user, via=who.via, action=action,
                                 target=target, before=before, after=after, **extra)  # fmt: skip


# ---- routes ----------------------------------------------------------------------------------------------


def _routes(app: FastAPI) -> None:
    # ---- health and metrics (no auth) -------------------------------------------------------------
    @app.get("/healthz", tags=["health"], summary="the HTTP process is alive")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="ready to work: store, broker, spool disk, and a worker with a usable model",
             responses={503: {"description": "not ready: the failing checks say why"}})  # fmt: skip
    def readyz(request: Request) -> JSONResponse:
        ctx = ctx_of(request)
        checks = readiness(ctx)
        ready = all(c["ok"] for c in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics (anatomix_*)", response_class=PlainTextResponse,
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

    # ---- sessions, tokens, accounts ------------------------------------------------------------------
    @app.post("/api/auth/login", tags=["auth"], summary="log in (console): sets an HttpOnly session cookie",
              responses={401: {"model": ProblemModel}, 429: {"model": ProblemModel}})  # fmt: skip
    def login(request: Request, response: Response, body: LoginIn) -> LoginOut:
        ctx = ctx_of(request)
        host = client_host(request) or "?"
        keys = [f"user:{body.username.lower()}", f"addr:{host}"]
        peer = Peer(None, None, host)
        wait = ctx.limiter.retry_after(keys)
        if wait > 0:
            ctx.trail.record(API_LOGIN_RATE_LIMITED, peer, user=body.username)
            raise Problem(429, "Too many failed logins", f"too many failed logins for this user or address: try again in {wait:.0f} s",
                          {"Retry-After": str(max(1, int(wait + 0.999)))})  # fmt: skip
        user = ctx.store.get_api_user(body.username)
        if user is None:
            auth.burn_verification(body.password)
        if user is None or user.disabled or not auth.verify_password(user.password_hash, body.password):
            ctx.limiter.failed(keys)
            reason = "unknown user" if user is None else "account disabled" if user.disabled else "wrong password"
            ctx.trail.record(API_LOGIN_FAILED, peer, user=body.username, reason=reason)
            raise Problem(401, "Login failed", "wrong user name or password (or the account is disabled)")
        ctx.limiter.succeeded(keys[:1])
        cookie, session = auth.new_session(user.name, ctx.settings.http.session_ttl_s)
        ctx.store.add_api_session(session)
        ctx.trail.record(API_LOGIN, peer, user=user.name, role=user.role)
        response.set_cookie(SESSION_COOKIE, cookie, max_age=int(ctx.settings.http.session_ttl_s), httponly=True, samesite="strict",
                            secure=ctx.settings.http.secure_cookies, path="/")  # fmt: skip
        return LoginOut(user=user.name, role=user.role, csrf_token=session.csrf_token, expires_at=session.expires_at)

    @app.post("/api/auth/logout", tags=["auth"], status_code=204, summary="end this session")
    def logout(request: Request, who: Viewer) -> Response:
        if who.session_hash:
            ctx_of(request).store.remove_api_session(who.session_hash)
        response = Response(status_code=204)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    @app.get("/api/auth/me", tags=["auth"], summary="who is calling")
    def me(who: Viewer) -> MeOut:
        return MeOut(user=who.user, role=who.role, via=who.via)  # type: ignore[arg-type]

    @app.get("/api/tokens", tags=["auth"], summary="API tokens: your own (admin: everyone's)")
    def list_tokens(request: Request, who: Viewer, user: Annotated[str | None, Query(max_length=64)] = None) -> list[TokenOut]:
        store = ctx_of(request).store
        if who.role != "admin":
            if user not in (None, who.user):
                raise Problem(403, "Forbidden", "only an admin may list another account's tokens")
            user = who.user
        return [_token_out(t) for t in store.list_api_tokens(user)]

    @app.post("/api/tokens", tags=["auth"], status_code=201, summary="create an API token for yourself (the secret is shown once)")
    def create_token(request: Request, who: Viewer, body: TokenIn) -> TokenCreated:
        secret = auth.new_secret(auth.TOKEN_PREFIX)
        token = ctx_of(request).store.add_api_token(who.user, body.label, auth.secret_hash(secret), datetime.now(UTC))
        audit_change(request, who, "token_created", who.user, after={"id": token.id, "label": token.label})
        return TokenCreated(**_token_out(token).model_dump(), token=secret)

    @app.delete("/api/tokens/{token_id}", tags=["auth"], status_code=204, summary="revoke a token (yours; admin: any)",
                responses={404: {"model": ProblemModel}})  # fmt: skip
    def revoke_token(request: Request, who: Viewer, token_id: Annotated[int, Path(ge=1, le=2**62)]) -> Response:
        store = ctx_of(request).store
        token = next((t for t in store.list_api_tokens(None if who.role == "admin" else who.user) if t.id == token_id), None)
        if token is None or token.revoked_at is not None or not store.revoke_api_token(token_id, datetime.now(UTC)):
            raise Problem(404, "No such token", f"no unrevoked token {token_id}" + ("" if who.role == "admin" else " of yours"))
        audit_change(request, who, "token_revoked", token.user_name, before={"id": token.id, "label": token.label})
        return Response(status_code=204)

    @app.get("/api/users", tags=["accounts"], summary="accounts (admin)")
    def list_users(request: Request, who: Admin) -> list[UserOut]:
        return [_user_out(u) for u in ctx_of(request).store.list_api_users()]

    @app.post("/api/users", tags=["accounts"], status_code=201, summary="add an account (admin); without a password one is generated and shown once",
              responses={409: {"model": ProblemModel}})  # fmt: skip
    def add_user(request: Request, who: Admin, body: UserIn) -> UserOut:
        password = body.password or auth.generate_password()
        if body.password is not None and (problem := auth.password_problem(body.password)):
            raise Problem(422, "Invalid request", f"password: {problem}")
        try:
            ctx_of(request).store.add_api_user(auth.new_user(body.name, body.role, password))
        except StoreConflict:
            raise Problem(409, "Account exists", f"an account named {body.name!r} already exists") from None
        user = ctx_of(request).store.get_api_user(body.name)
        audit_change(request, who, "user_added", body.name, after={"role": body.role})
        return _user_out(user, None if body.password else password)

    @app.patch("/api/users/{name}", tags=["accounts"], summary="change an account's role, disable it, or reset its password (admin)",
               responses={404: {"model": ProblemModel}, 409: {"model": ProblemModel}})  # fmt: skip
    def update_user(request: Request, who: Admin, name: Name, body: UserPatch) -> UserOut:
        store = ctx_of(request).store
        before = store.get_api_user(name)
        if before is None:
            raise Problem(404, "No such account", f"no account named {name!r}")
        demoted = (body.role not in (None, "admin")) or body.disabled
        if before.role == "admin" and demoted and _admins(store) == [name]:
            raise Problem(409, "Last admin", f"{name} is the only enabled admin: add another admin first")
        password = auth.generate_password() if body.reset_password else None
        store.update_api_user(name, role=body.role, disabled=body.disabled, password_hash=auth.hash_password(password) if password else None)
        after = store.get_api_user(name)
        audit_change(request, who, "user_updated", name, before={"role": before.role, "disabled": before.disabled},
                     after={"role": after.role, "disabled": after.disabled}, password_reset=bool(password))  # fmt: skip
        return _user_out(after, password)

    @app.delete("/api/users/{name}", tags=["accounts"], status_code=204, summary="remove an account with its tokens (admin)",
                responses={404: {"model": ProblemModel}, 409: {"model": ProblemModel}})  # fmt: skip
    def remove_user(request: Request, who: Admin, name: Name) -> Response:
        store = ctx_of(request).store
        user = store.get_api_user(name)
        if user is None:
            raise Problem(404, "No such account", f"no account named {name!r}")
        if user.role == "admin" and _admins(store) == [name]:
            raise Problem(409, "Last admin", f"{name} is the only enabled admin: add another admin first")
        store.remove_api_user(name)
        audit_change(request, who, "user_removed", name, before={"role": user.role, "disabled": user.disabled})
        return Response(status_code=204)

    # ---- remote nodes ------------------------------------------------------------------------------
    @app.get("/api/nodes", tags=["nodes"], summary="remote DICOM nodes")
    def list_nodes(request: Request, who: Viewer) -> list[NodeOut]:
        return [NodeOut(**asdict(n)) for n in ctx_of(request).store.list_remote_nodes()]

    @app.get("/api/nodes/{name}", tags=["nodes"], responses={404: {"model": ProblemModel}})
    def get_node(request: Request, who: Viewer, name: Name) -> NodeOut:
        return NodeOut(**asdict(_require_node(ctx_of(request).store, name)))

    @app.post("/api/nodes", tags=["nodes"], status_code=201, summary="add a remote node (admin)",
              responses={409: {"model": ProblemModel}})  # fmt: skip
    def add_node(request: Request, who: Admin, body: NodeIn) -> NodeOut:
        ctx = ctx_of(request)
        node = replace(_validated_node(ctx.settings, body.model_dump()), tls_client_certificate=body.tls_client_certificate or "optional")
        try:
            ctx.store.add_remote_node(node)
        except StoreConflict:
            raise Problem(409, "Node exists", f"a remote node named {node.name!r} already exists") from None
        audit_change(request, who, "node_added", node.name, after=asdict(node))
        return NodeOut(**asdict(node))

    @app.patch("/api/nodes/{name}", tags=["nodes"], summary="change some settings of a remote node (admin)",
               responses={404: {"model": ProblemModel}})  # fmt: skip
    def update_node(request: Request, who: Admin, name: Name, body: NodePatch) -> NodeOut:
        ctx = ctx_of(request)
        current = _require_node(ctx.store, name)
        changes = body.model_dump(exclude_unset=True)
        merged = {**asdict(current), **{k: v for k, v in changes.items() if v is not None or k in ("quiet_period_s", "profile")}}
        tls_kept = {k: getattr(current, k) for k in ("tls", "tls_ca_file", "tls_cert_file", "tls_key_file", "tls_verify_peer", "tls_check_hostname")}
        node = replace(_validated_node(ctx.settings, merged), **tls_kept,
                       tls_client_certificate=changes.get("tls_client_certificate") or current.tls_client_certificate)  # fmt: skip
        if node != current:
            ctx.store.update_remote_node(node)
            before = {k: v for k, v in asdict(current).items() if getattr(node, k) != v}
            audit_change(request, who, "node_updated", name, before=before, after={k: getattr(node, k) for k in before})
        return NodeOut(**asdict(node))

    @app.delete("/api/nodes/{name}", tags=["nodes"], status_code=204, summary="remove a remote node (admin)",
                responses={404: {"model": ProblemModel}})  # fmt: skip
    def remove_node(request: Request, who: Admin, name: Name) -> Response:
        store = ctx_of(request).store
        node = _require_node(store, name)
        store.remove_remote_node(name)
        audit_change(request, who, "node_removed", name, before=asdict(node))
        return Response(status_code=204)

    @app.post("/api/nodes/{name}/echo", tags=["nodes"], summary="C-ECHO the node (operator): result and round-trip time",
              responses={404: {"model": ProblemModel}})  # fmt: skip
    def echo_node(request: Request, who: Operator, name: Name, body: Annotated[EchoIn | None, Body()] = None) -> EchoOut:
        from dicom_node.ops.remotes import echo_remote

        ctx = ctx_of(request)
        node = _require_node(ctx.store, name)
        timeout = body.timeout_s if body and body.timeout_s else ctx.settings.delivery.timeout_s
        try:
            rtt = echo_remote(ctx.settings.node.ae_title, node, timeout)
        except UserError as exc:
            return EchoOut(node=name, success=False, rtt_ms=None, error=str(exc))
        except (OSError, UnicodeError, ValueError) as exc:  # e.g. a host name the resolver cannot even encode
            return EchoOut(node=name, success=False, rtt_ms=None, error=f"echo {name}: cannot connect to {node.host!r}: {exc}")
        return EchoOut(node=name, success=True, rtt_ms=round(rtt, 2), error=None)

    # ---- studies -----------------------------------------------------------------------------------
    @app.get("/api/studies", tags=["studies"], summary="studies, newest first: state, counts, skip reasons, stage timings, deliveries")
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
        since, until = _aware(since), _aware(until)
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

    @app.get("/api/studies/{study_instance_uid}", tags=["studies"], summary="one study: stages, instances, skip reasons, result objects, deliveries",
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

    @app.get("/api/dead-letters", tags=["studies"], summary="result objects a destination did not get (failed or dead-lettered)")
    def dead_letters(request: Request, who: Viewer, destination: Annotated[str | None, Query(max_length=64)] = None) -> list[dict[str, Any]]:
        store = ctx_of(request).store
        rows = store.list_deliveries(statuses=("failed", "dead"))
        return [_delivery_out(d) for d in rows if destination in (None, d.destination)]

    @app.post("/api/studies/{study_instance_uid}/resend", tags=["studies"], summary="send a study's results again (operator)",
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

    @app.post("/api/resend", tags=["studies"], summary="send the results of many studies again (operator)")
    def resend_bulk(request: Request, who: Operator, body: BulkResendIn) -> BulkOut:
        from dicom_node.ops.studies import select_studies

        ctx = ctx_of(request)
        target = _destination(ctx.store, body.destination)
        try:
            studies = select_studies(ctx.store, None, list(body.states) or None, _aware(body.since), body.undelivered)
        except UserError as exc:
            raise Problem(422, "Invalid request", str(exc)) from None
        results = [_resend(ctx, who, s, target, bulk=True) for s in studies]
        audit_change(request, who, "bulk_resend", f"{len(studies)} studies", selection=body.model_dump(mode="json"),
                     ok=sum(r.ok for r in results))  # fmt: skip
        return BulkOut(matched=len(studies), results=results)

    @app.post("/api/studies/{study_instance_uid}/reanalyze", tags=["studies"], summary="analyse a study again (operator)",
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

    @app.post("/api/reanalyze", tags=["studies"], summary="analyse many studies again (operator)", responses={409: {"model": ProblemModel}})
    def reanalyze_bulk(request: Request, who: Operator, body: BulkReanalyzeIn) -> BulkOut:
        from dicom_node.ops.studies import select_studies

        ctx = ctx_of(request)
        _require_model(ctx)
        try:
            studies = select_studies(ctx.store, None, list(body.states) or None, _aware(body.since))
        except UserError as exc:
            raise Problem(422, "Invalid request", str(exc)) from None
        results = [_reanalyze(ctx, who, s, body.new_version) for s in studies]
        audit_change(request, who, "bulk_reanalyze", f"{len(studies)} studies", selection=body.model_dump(mode="json"),
                     ok=sum(r.ok for r in results))  # fmt: skip
        return BulkOut(matched=len(studies), results=results)

    # ---- audit ----------------------------------------------------------------------------------------
    @app.get("/api/audit", tags=["audit"], summary="audit events, newest first")
    def audit_query(
        request: Request,
        who: Viewer,
        event: Annotated[str | None, Query(max_length=64)] = None,
        since: Annotated[datetime | None, Query()] = None,
        study_instance_uid: Annotated[str | None, Query(max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=10000)] = 200,
    ) -> list[dict[str, Any]]:
        return [_audit_out(e) for e in _audit_rows(ctx_of(request).store, event, _aware(since), study_instance_uid, limit)]

    @app.get("/api/audit/export", tags=["audit"], summary="audit events as JSON lines, oldest first (admin; the export is audited)",
             response_class=StreamingResponse, responses={200: {"content": {"application/x-ndjson": {}}}})  # fmt: skip
    def audit_export(
        request: Request,
        who: Admin,
        event: Annotated[str | None, Query(max_length=64)] = None,
        since: Annotated[datetime | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=1_000_000)] = 100_000,
    ) -> StreamingResponse:
        ctx = ctx_of(request)
        rows = list(reversed(_audit_rows(ctx.store, event, _aware(since), None, limit)))
        ctx.trail.record(AUDIT_EXPORTED, Peer(None, None, client_host(request)), user=who.user, events=len(rows),
                         filter={"event": event, "since": since.isoformat() if since else None})  # fmt: skip

        def lines() -> Iterator[bytes]:
            for row in rows:
                yield (json.dumps(_audit_out(row), sort_keys=True) + "\n").encode()

        return StreamingResponse(lines(), media_type="application/x-ndjson",
                                 headers={"Content-Disposition": 'attachment; filename="anatomix-audit.jsonl"'})  # fmt: skip

    # ---- model and node status ---------------------------------------------------------------------
    @app.get("/api/model", tags=["node"],
             summary="the model in use: settings, the model each live analyze worker loaded, the identity the newest analysis recorded")  # fmt: skip
    def model(request: Request, who: Viewer) -> dict[str, Any]:
        from dicom_node.pipeline.dispatch import model_configured

        ctx = ctx_of(request)
        m = ctx.settings.model
        keys = ("name", "model", "model_name", "model_version", "model_digest", "demo_weights", "device", "load_seconds", "error")
        loaded = [{k: w[k] for k in keys} for w in _workers(ctx) if w["live"] and "analyze" in w["queues"]]
        return {
            "configured": model_configured(ctx.settings), "demo_weights": m.demo_weights, "dir": str(m.dir) if m.dir else None,
            "backend": m.backend, "device": m.device, "tasks": list(m.tasks), "workers": loaded, "last_used": _last_model_identity(ctx.store),
        }  # fmt: skip

    @app.get("/api/status", tags=["node"], summary="node status: identity, disk, studies by state, queue depths, dead letters, workers seen")
    def status(request: Request, who: Viewer) -> dict[str, Any]:
        ctx = ctx_of(request)
        s = ctx.settings
        counts = {**{state: 0 for state in STUDY_STATES}, **ctx.store.count_studies_by_state()}  # type: ignore[attr-defined]
        return {
            "ae_title": s.node.ae_title, "dicom_port": s.node.port, "scp_processes": s.node.scp_processes,
            "store": "postgresql" if s.database_url.startswith("postgres") else "sqlite", "embedded": s.embedded,
            "disk": _disk(s), "studies_by_state": counts, "queue_depths": ctx.queue_depths(),
            "dead_letters": len(ctx.store.list_deliveries(statuses=("dead",))),
            "api_uptime_s": round(time.monotonic() - ctx.started, 1), "hostname": socket.gethostname(),
            "workers": _workers(ctx), "certificates": _certificates(ctx),
        }  # fmt: skip


# ---- helpers ------------------------------------------------------------------------------------------------


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _token_out(token: Any) -> TokenOut:
    return TokenOut(id=token.id, user=token.user_name, label=token.label, created_at=token.created_at,
                    last_used_at=token.last_used_at, revoked_at=token.revoked_at)  # fmt: skip


def _user_out(user: Any, password: str | None = None) -> UserOut:
    return UserOut(name=user.name, role=user.role, disabled=user.disabled, created_at=user.created_at,
                   password_changed_at=user.password_changed_at, password=password)  # fmt: skip


def _admins(store: Any) -> list[str]:
    return [u.name for u in store.list_api_users() if u.role == "admin" and not u.disabled]


def _require_node(store: Store, name: str) -> RemoteNode:
    node = store.get_remote_node(name)
    if node is None:
        raise Problem(404, "No such node", f"no remote node named {name!r} (GET /api/nodes lists them)")
    return node


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


def _validated_node(settings: Settings, values: dict[str, Any]) -> RemoteNode:
    """The shared remote node validation (as for ``ae add``); its errors, naming the field, as 422."""
    from dicom_node.ops.remotes import validated_remote_node

    try:
        return validated_remote_node(
            settings, name=values["name"], ae_title=values["ae_title"], host=values["host"], port=values["port"], role=values["role"],
            profile=values.get("profile"), quiet_period_s=values.get("quiet_period_s"),
            complete_on_release=bool(values.get("complete_on_release")), default_destination=bool(values.get("default_destination")),
        )  # fmt: skip
    except UserError as exc:
        raise Problem(422, "Invalid request", str(exc)) from None


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


def _audit_rows(store: Store, event: str | None, since: datetime | None, study: str | None, limit: int) -> list[Any]:
    rows = store.list_audit_events(event, limit=limit if since is None and study is None else max(limit, 100_000))
    rows = [r for r in rows if (since is None or r.at >= since) and (study is None or r.study_instance_uid == study)]
    return rows[:limit]


def _audit_out(e: Any) -> dict[str, Any]:
    return {"id": e.id, "at": e.at.isoformat(), "event": e.event, "calling_ae": e.calling_ae, "called_ae": e.called_ae,
            "peer_host": e.peer_host, "study_instance_uid": e.study_instance_uid, "sop_instance_uid": e.sop_instance_uid,
            "detail": e.detail}  # fmt: skip


def _last_model_identity(store: Store) -> dict[str, Any] | None:
    for study in store.list_studies(("analyzed", "delivering", "done"), limit=20):
        for analysis in store.list_analyses(study.study_instance_uid, study.version):
            if analysis.result_json:
                try:
                    model = json.loads(analysis.result_json).get("model")
                except ValueError:
                    continue
                if isinstance(model, dict):
                    return {**model, "seen_at": analysis.created_at.isoformat(), "study_instance_uid": study.study_instance_uid}
    return None


def _workers(ctx: ApiContext) -> list[dict[str, Any]]:
    """Workers seen (their reports, most recent first; ``live`` within http.worker_report_max_age_s)."""
    now = datetime.now(UTC)
    max_age = ctx.settings.http.worker_report_max_age_s
    return [worker_out(r, now, max_age) for r in ctx.store.list_worker_reports()]  # type: ignore[attr-defined]


def _certificates(ctx: ApiContext) -> list[dict[str, Any]]:
    """The TLS certificates in use (the SCP's, its trusted CAs, each TLS remote node's files): expiry,
    days left and the warning the start-up log gives (expired, within tls.expiry_warning_days, unreadable)."""
    from dicom_node.net.tls import certificate_status

    warn_days = ctx.settings.tls.expiry_warning_days
    return [
        {"role": c.role, "path": c.path, "subject": c.subject, "not_after": c.not_after,
         "days_left": None if c.days_left is None else round(c.days_left, 1), "error": c.error, "warning": c.warning(warn_days)}
        for c in certificate_status(ctx.settings, ctx.store.list_remote_nodes())
    ]  # fmt: skip


def _disk(settings: Settings) -> dict[str, Any]:
    path = settings.storage.spool_dir
    try:
        usage = shutil.disk_usage(path)
    except OSError as exc:
        return {"path": str(path), "error": str(exc)}
    return {"path": str(path), "total_bytes": usage.total, "free_bytes": usage.free, "min_free_bytes": settings.storage.min_free_bytes}


def readiness(ctx: ApiContext) -> dict[str, dict[str, Any]]:
    """Each readiness check with ``ok`` and what was found."""
    checks: dict[str, dict[str, Any]] = {}
    try:
        ctx.store.ping()
        checks["store"] = {"ok": True}
    except StoreError as exc:
        checks["store"] = {"ok": False, "detail": str(exc)}
    try:
        with ctx.celery().connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = {"ok": True}
    except Exception as exc:  # any broker failure means "not ready", with its text
        checks["broker"] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"}
    watermark = ctx.settings.http.readiness_min_free_bytes
    watermark = ctx.settings.storage.min_free_bytes if watermark < 0 else watermark
    try:
        free = shutil.disk_usage(ctx.settings.storage.spool_dir).free
        checks["spool_disk"] = {"ok": free > watermark, "free_bytes": free, "min_free_bytes": watermark}
    except OSError as exc:
        checks["spool_disk"] = {"ok": False, "detail": str(exc)}
    checks["model"] = model_readiness(ctx)
    return checks


def worker_out(report: Any, now: datetime, max_age_s: float) -> dict[str, Any]:
    """One worker as /api/status shows it; ``model``: loaded, loading, failed, or none (not analysing)."""
    age = (now - report.last_seen_at).total_seconds()
    analyses = "analyze" in report.queues
    model = "loaded" if report.model_ok else "failed" if report.error else "loading" if analyses else "none"
    return {
        "name": report.name, "hostname": report.hostname, "pid": report.pid, "queues": list(report.queues),
        "started_at": report.started_at.isoformat(), "last_seen_at": report.last_seen_at.isoformat(),
        "seen_s_ago": round(age, 1), "live": age <= max_age_s, "model": model, "model_ok": report.model_ok,
        "model_name": report.model_name, "model_version": report.model_version, "model_digest": report.model_digest,
        "demo_weights": report.demo_weights, "device": report.device, "load_seconds": report.load_seconds, "error": report.error,
    }  # fmt: skip


def model_readiness(ctx: ApiContext) -> dict[str, Any]:
    """Ready when some live analyze worker (a report within ``http.worker_report_max_age_s``) has loaded
    the model; else why not. Without a configured model nothing is analysed, and that is not a fault."""
    from dicom_node.pipeline.dispatch import model_configured

    if not model_configured(ctx.settings):
        return {"ok": True, "detail": "no model configured: studies are received and not analysed"}
    max_age = ctx.settings.http.worker_report_max_age_s
    try:
        reports = [r for r in ctx.store.list_worker_reports() if "analyze" in r.queues]  # type: ignore[attr-defined]
    except StoreError as exc:
        return {"ok": False, "detail": f"worker reports unreadable: {exc}"}
    now = datetime.now(UTC)
    live = [r for r in reports if (now - r.last_seen_at).total_seconds() <= max_age]
    usable = [r for r in live if r.model_ok]
    if usable:
        newest = usable[0]
        return {"ok": True, "workers": [r.name for r in usable], "model_name": newest.model_name, "model_version": newest.model_version,
                "model_digest": newest.model_digest, "demo_weights": newest.demo_weights, "load_seconds": newest.load_seconds}  # fmt: skip
    if not live:
        last = f"; the last report came from {reports[0].name} {(now - reports[0].last_seen_at).total_seconds():.0f} s ago" if reports else ""
        detail = f"no analyze worker has reported in the last {max_age:g} s (http.worker_report_max_age_s){last}"
    elif any(r.error for r in live):
        failed = next(r for r in live if r.error)
        detail = f"no live worker has a usable model: {failed.name} could not load it ({failed.error})"
    else:
        detail = f"no live worker has a usable model yet: {', '.join(r.name for r in live)} still loading it"
    return {"ok": False, "detail": detail}
