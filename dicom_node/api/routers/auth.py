"""Sessions and API tokens: log in and out (the console's session cookie), who is calling, and tokens."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, Field

from dicom_node.api import auth
from dicom_node.api.auth import SESSION_COOKIE
from dicom_node.api.deps import (
    API_LOGIN,
    API_LOGIN_FAILED,
    API_LOGIN_RATE_LIMITED,
    Account,
    Problem,
    ProblemModel,
    Role,
    Viewer,
    as_role,
    audit_change,
    client_host,
    ctx_of,
)
from dicom_node.audit.trail import Peer

router = APIRouter(tags=["auth"])


class LoginIn(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class LoginOut(BaseModel):
    user: str
    role: Role
    csrf_token: str
    expires_at: datetime
    must_change_password: bool = Field(default=False, description="logged in with a one-time password: POST /api/auth/password before anything else")


class PasswordIn(BaseModel):
    current_password: str = Field(min_length=1, max_length=1024)
    new_password: str = Field(min_length=1, max_length=1024, description=f"at least {auth.MIN_PASSWORD_LENGTH} characters")


class MeOut(BaseModel):
    user: str
    role: Role
    via: Literal["token", "session"]
    must_change_password: bool = False


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


@router.post("/api/auth/login", summary="log in (console): sets an HttpOnly session cookie",
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
    return LoginOut(user=user.name, role=as_role(user.role), csrf_token=session.csrf_token, expires_at=session.expires_at,
                    must_change_password=user.must_change_password)  # fmt: skip


@router.post("/api/auth/logout", status_code=204, summary="end this session")
def logout(request: Request, who: Account) -> Response:
    if who.session_hash:
        ctx_of(request).store.remove_api_session(who.session_hash)
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


@router.get("/api/auth/me", summary="who is calling")
def me(who: Account) -> MeOut:
    return MeOut(user=who.user, role=as_role(who.role), via=who.via, must_change_password=who.must_change_password)


@router.post("/api/auth/password", status_code=204, summary="change your own password (also the one-time password of a first login)",
             responses={401: {"model": ProblemModel}, 422: {"model": ProblemModel}, 429: {"model": ProblemModel}})  # fmt: skip
def change_password(request: Request, who: Account, body: PasswordIn) -> Response:
    """The current password is checked (failures count towards the login limit); the new one must
    meet the password rule and differ from it. Ends the account's other sessions, keeps this one."""
    ctx = ctx_of(request)
    keys = [f"user:{who.user.lower()}", f"addr:{client_host(request) or '?'}"]
    wait = ctx.limiter.retry_after(keys)
    if wait > 0:
        raise Problem(429, "Too many failed attempts", f"too many wrong passwords: try again in {wait:.0f} s", {"Retry-After": str(max(1, int(wait + 0.999)))})
    user = ctx.store.get_api_user(who.user)
    if user is None or not auth.verify_password(user.password_hash, body.current_password):
        ctx.limiter.failed(keys)
        raise Problem(422, "Invalid request", "current_password: this is not your current password",
                      errors=[{"where": "body.current_password", "message": "This is not your current password."}])  # fmt: skip
    problem = auth.password_problem(body.new_password)
    if problem is None and body.new_password == body.current_password:
        problem = "choose a password other than the current one"
    if problem:
        raise Problem(422, "Invalid request", f"new_password: {problem}", errors=[{"where": "body.new_password", "message": problem}])
    ctx.store.update_api_user(who.user, password_hash=auth.hash_password(body.new_password), must_change_password=False, keep_session=who.session_hash)
    audit_change(request, who, "password_changed", who.user, after={"one_time_password_replaced": user.must_change_password})
    return Response(status_code=204)


@router.get("/api/tokens", summary="API tokens: your own (admin: everyone's)")
def list_tokens(request: Request, who: Viewer, user: Annotated[str | None, Query(max_length=64)] = None) -> list[TokenOut]:
    store = ctx_of(request).store
    if who.role != "admin":
        if user not in (None, who.user):
            raise Problem(403, "Forbidden", "only an admin may list another account's tokens")
        user = who.user
    return [_token_out(t) for t in store.list_api_tokens(user)]


@router.post("/api/tokens", status_code=201, summary="create an API token for yourself (the secret is shown once)")
def create_token(request: Request, who: Viewer, body: TokenIn) -> TokenCreated:
    secret = auth.new_secret(auth.TOKEN_PREFIX)
    token = ctx_of(request).store.add_api_token(who.user, body.label, auth.secret_hash(secret), datetime.now(UTC))
    audit_change(request, who, "token_created", who.user, after={"id": token.id, "label": token.label})
    return TokenCreated(**_token_out(token).model_dump(), token=secret)


@router.delete("/api/tokens/{token_id}", status_code=204, summary="revoke a token (yours; admin: any)",
               responses={404: {"model": ProblemModel}})  # fmt: skip
def revoke_token(request: Request, who: Viewer, token_id: Annotated[int, Path(ge=1, le=2**62)]) -> Response:
    store = ctx_of(request).store
    token = next((t for t in store.list_api_tokens(None if who.role == "admin" else who.user) if t.id == token_id), None)
    if token is None or token.revoked_at is not None or not store.revoke_api_token(token_id, datetime.now(UTC)):
        raise Problem(404, "No such token", f"no unrevoked token {token_id}" + ("" if who.role == "admin" else " of yours"))
    audit_change(request, who, "token_revoked", token.user_name, before={"id": token.id, "label": token.label})
    return Response(status_code=204)


def _token_out(token: Any) -> TokenOut:
    return TokenOut(id=token.id, user=token.user_name, label=token.label, created_at=token.created_at,
                    last_used_at=token.last_used_at, revoked_at=token.revoked_at)  # fmt: skip
