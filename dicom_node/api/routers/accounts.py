"""Accounts (admin): list, add, change (role, disabled, password reset) and remove; the last enabled admin stays."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from dicom_node.api import auth
from dicom_node.api.deps import Admin, Name, Problem, ProblemModel, Role, audit_change, ctx_of
from dicom_node.store.base import StoreConflict

router = APIRouter(tags=["accounts"])


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
    must_change_password: bool = Field(default=False, description="a one-time password not yet changed by its owner")
    password: str | None = Field(default=None, description="a generated one-time password, shown only in this answer; changed at the first login")


@router.get("/api/users", summary="accounts (admin)")
def list_users(request: Request, who: Admin) -> list[UserOut]:
    return [_user_out(u) for u in ctx_of(request).store.list_api_users()]


@router.post("/api/users", status_code=201, summary="add an account (admin); without a password one is generated and shown once",
             responses={409: {"model": ProblemModel}})  # fmt: skip
def add_user(request: Request, who: Admin, body: UserIn) -> UserOut:
    password = body.password or auth.generate_password()
    if body.password is not None and (problem := auth.password_problem(body.password)):
        raise Problem(422, "Invalid request", f"password: {problem}")
    try:
        ctx_of(request).store.add_api_user(auth.new_user(body.name, body.role, password, must_change_password=body.password is None))
    except StoreConflict:
        raise Problem(409, "Account exists", f"an account named {body.name!r} already exists") from None
    user = ctx_of(request).store.get_api_user(body.name)
    audit_change(request, who, "user_added", body.name, after={"role": body.role})
    return _user_out(user, None if body.password else password)


@router.patch("/api/users/{name}", summary="change an account's role, disable it, or reset its password (admin)",
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
    store.update_api_user(name, role=body.role, disabled=body.disabled, password_hash=auth.hash_password(password) if password else None,
                          must_change_password=True if password else None)  # fmt: skip
    after = store.get_api_user(name)
    if after is None:  # removed meanwhile by another admin
        raise Problem(404, "No such account", f"no account named {name!r}")
    audit_change(request, who, "user_updated", name, before={"role": before.role, "disabled": before.disabled},
                 after={"role": after.role, "disabled": after.disabled}, password_reset=bool(password))  # fmt: skip
    return _user_out(after, password)


@router.delete("/api/users/{name}", status_code=204, summary="remove an account with its tokens (admin)",
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


def _user_out(user: Any, password: str | None = None) -> UserOut:
    return UserOut(name=user.name, role=user.role, disabled=user.disabled, created_at=user.created_at,
                   password_changed_at=user.password_changed_at, must_change_password=user.must_change_password, password=password)  # fmt: skip


def _admins(store: Any) -> list[str]:
    return [u.name for u in store.list_api_users() if u.role == "admin" and not u.disabled]
