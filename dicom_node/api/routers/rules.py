"""Routing rules over HTTP: the same model, validation, store and audit as ``anatomix-node route``.

Every call goes through :mod:`dicom_node.pipeline.routing`, so a rule the CLI refuses is refused here with
the same field names (in the problem's ``errors`` list), and the dry run explains a match the same way.
Reading and the dry run need the viewer role; every change needs admin and is audited with the rule
before and after.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Request
from pydantic import BaseModel, Field

from dicom_node.api.deps import Admin, Problem, ProblemModel, Viewer, client_host, ctx_of
from dicom_node.pipeline.routing import (
    RoutingRule,
    RuleValidationError,
    add_rule,
    audit_rule_change,
    decide_routes,
    get_rule,
    list_rules,
    move_rule,
    parse_rule,
    remove_rule,
    update_rule,
)
from dicom_node.store.base import StoreConflict

router = APIRouter(tags=["routing"])

_RULE_NAME = Path(description="the rule's name", max_length=64)


class RuleIn(BaseModel):
    """A rule as ``route add`` takes it: every condition named in ``match`` must hold (any of its
    values, exact or glob, case-insensitive); the first enabled rule that matches decides."""

    name: str = Field(max_length=64)
    match: dict[str, list[str]] = Field(default_factory=dict, description="calling_ae, source, modality, body_part, institution, station")
    action: dict[str, Any] = Field(default_factory=dict, description="destinations (names), profile (or null), send_to_sender")
    description: str = ""
    enabled: bool = True
    position: int | None = Field(default=None, ge=1, description="1 = evaluated first; default: last (only when adding)")


class RuleOut(BaseModel):
    name: str
    position: int
    enabled: bool
    description: str
    match: dict[str, list[str]]
    action: dict[str, Any]


class MoveIn(BaseModel):
    position: int = Field(ge=1, le=100_000)


class DryRunIn(BaseModel):
    study_instance_uid: str | None = Field(default=None, max_length=64, description="default: the latest study")


def _parsed(body: RuleIn) -> RoutingRule:
    try:
        return parse_rule(body.model_dump(exclude={"position"}))
    except RuleValidationError as exc:
        raise _invalid(exc) from None


def _invalid(exc: RuleValidationError) -> Problem:
    return Problem(422, "Invalid routing rule", str(exc), errors=[{"field": e.field, "message": e.message} for e in exc.errors])


def _require_rule(store: Any, name: str) -> RoutingRule:
    rule = get_rule(store, name)
    if rule is None:
        raise Problem(404, "No such rule", f"no routing rule named {name!r} (GET /api/routing-rules lists them)")
    return rule


def _out(rule: RoutingRule) -> RuleOut:
    return RuleOut(**rule.as_dict())


def _audit(request: Request, who: Any, change: str, before: RoutingRule | None, after: RoutingRule | None) -> None:
    ctx = ctx_of(request)
    audit_rule_change(ctx.store, ctx.settings, change, before, after, user=who.user, host=client_host(request))


@router.get("/api/routing-rules", summary="routing rules in evaluation order")
def rules_list(request: Request, who: Viewer) -> list[RuleOut]:
    return [_out(rule) for rule in list_rules(ctx_of(request).store)]


@router.post("/api/routing-rules", status_code=201, summary="add a routing rule (admin); validated against the configured nodes and profiles",
             responses={409: {"model": ProblemModel}, 422: {"model": ProblemModel}})  # fmt: skip
def rules_add(request: Request, who: Admin, body: RuleIn) -> RuleOut:
    ctx = ctx_of(request)
    rule = _parsed(body)
    try:
        stored = add_rule(ctx.store, ctx.settings, rule, body.position)
    except RuleValidationError as exc:
        raise _invalid(exc) from None
    except StoreConflict:
        raise Problem(409, "Rule exists", f"a routing rule named {rule.name!r} exists: PUT /api/routing-rules/{rule.name} changes it") from None
    _audit(request, who, "add", None, stored)
    return _out(stored)


@router.get("/api/routing-rules/{name}", summary="one routing rule", responses={404: {"model": ProblemModel}})
def rules_get(request: Request, who: Viewer, name: Annotated[str, _RULE_NAME]) -> RuleOut:
    return _out(_require_rule(ctx_of(request).store, name))


@router.put("/api/routing-rules/{name}", summary="replace a rule's match, action, description and enabled (admin); its place stays",
            responses={404: {"model": ProblemModel}, 422: {"model": ProblemModel}})  # fmt: skip
def rules_update(request: Request, who: Admin, name: Annotated[str, _RULE_NAME], body: RuleIn) -> RuleOut:
    ctx = ctx_of(request)
    if body.name != name:
        raise Problem(422, "Invalid routing rule", f"name: the body names {body.name!r} but the path {name!r}; rules are not renamed",
                      errors=[{"field": "name", "message": "must equal the name in the path"}])  # fmt: skip
    before = _require_rule(ctx.store, name)
    try:
        after = update_rule(ctx.store, ctx.settings, _parsed(body))
    except RuleValidationError as exc:
        raise _invalid(exc) from None
    _audit(request, who, "update", before, after)
    return _out(after)


@router.post("/api/routing-rules/{name}/move", summary="put a rule at another place in the order (admin)", responses={404: {"model": ProblemModel}})
def rules_move(request: Request, who: Admin, name: Annotated[str, _RULE_NAME], body: MoveIn) -> RuleOut:
    ctx = ctx_of(request)
    before = _require_rule(ctx.store, name)
    after = move_rule(ctx.store, name, body.position)
    _audit(request, who, "move", before, after)
    return _out(after)


@router.delete("/api/routing-rules/{name}", status_code=204, summary="remove a routing rule (admin)", responses={404: {"model": ProblemModel}})
def rules_remove(request: Request, who: Admin, name: Annotated[str, _RULE_NAME]) -> None:
    ctx = ctx_of(request)
    before = _require_rule(ctx.store, name)
    remove_rule(ctx.store, name)
    _audit(request, who, "remove", before, None)


@router.post("/api/routing-rules/dry-run", summary="which rule a study matches and why, and where its results would go",
             responses={404: {"model": ProblemModel}})  # fmt: skip
def rules_dry_run(request: Request, who: Viewer, body: Annotated[DryRunIn | None, Body()] = None) -> dict[str, Any]:
    body = body or DryRunIn()
    store = ctx_of(request).store
    if body.study_instance_uid:
        study = store.get_study(body.study_instance_uid)
        if study is None:
            raise Problem(404, "No such study", f"no study {body.study_instance_uid} in the state store")
    else:
        latest = store.list_studies(limit=1)
        if not latest:
            raise Problem(404, "No studies", "no studies received yet: give a study_instance_uid once one has arrived")
        study = latest[0]
    return decide_routes(store, ctx_of(request).settings, study, read_headers=True).as_dict()
