"""Output profiles over HTTP (read only): which result objects a destination gets.

Profiles are edited in the settings file (``[output] profiles`` over the built-in ones, and
``default_profile``) and take effect when the node restarts; the API lists them with what refers to
each: remote nodes (their ``profile``) and routing rules (``action.profile``). Both are validated
against this list when saved (``POST/PATCH /api/nodes``, ``/api/routing-rules``: 422 naming the known
profiles); a reference that a later edit of the settings file left dangling is listed under
``unknown_profile`` of ``GET /api/profile-references`` so an admin can see it. Viewer role.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, Field

from dicom_node.api.deps import Problem, ProblemModel, Viewer, ctx_of
from dicom_node.pipeline.routing import list_rules
from dicom_node.settings import DEFAULT_PROFILES, OBJECT_KINDS, Settings
from dicom_node.store.base import Store

router = APIRouter(tags=["profiles"])

EDITED_IN_CONFIG = (
    "Profiles are edited in the settings file (`[output] profiles`, `default_profile`), not through the API; a change takes effect when the node restarts."
)


class ProfileOut(BaseModel):
    name: str
    kinds: list[str] = Field(description=f"result objects produced, in send order; kinds: {', '.join(OBJECT_KINDS)}")
    default: bool = Field(description="output.default_profile: used by nodes that name none")
    source: str = Field(description="'built-in', or 'settings' (defined or overridden in [output] profiles)")
    nodes: list[str] = Field(description="remote nodes with this profile")
    routing_rules: list[str] = Field(description="routing rules whose action sends in this profile")


class Reference(BaseModel):
    kind: str = Field(description="'node' or 'routing_rule'")
    name: str
    profile: str


class ReferencesOut(BaseModel):
    unknown_profile: list[Reference] = Field(description="references to a profile the settings no longer define")


def _profiles(settings: Settings) -> dict[str, tuple[str, ...]]:
    return {**DEFAULT_PROFILES, **settings.output.profiles}


def _references(settings: Settings, store: Store) -> list[Reference]:
    refs = [Reference(kind="node", name=n.name, profile=n.profile) for n in store.list_remote_nodes()]
    refs += [Reference(kind="routing_rule", name=r.name, profile=r.action.profile) for r in list_rules(store) if r.action.profile]
    return refs


def _out(settings: Settings, name: str, kinds: tuple[str, ...], refs: list[Reference]) -> ProfileOut:
    return ProfileOut(
        name=name, kinds=list(kinds), default=name == settings.output.default_profile,
        source="settings" if name in settings.output.profiles else "built-in",
        nodes=[r.name for r in refs if r.kind == "node" and r.profile == name],
        routing_rules=[r.name for r in refs if r.kind == "routing_rule" and r.profile == name],
    )  # fmt: skip


@router.get("/api/profiles", summary="output profiles (read only: edited in the settings file)", description=EDITED_IN_CONFIG)
def profiles_list(request: Request, who: Viewer) -> list[ProfileOut]:
    ctx = ctx_of(request)
    refs = _references(ctx.settings, ctx.store)
    return [_out(ctx.settings, name, kinds, refs) for name, kinds in sorted(_profiles(ctx.settings).items())]


@router.get("/api/profile-references", summary="nodes and routing rules naming a profile the settings do not define",
            description=EDITED_IN_CONFIG)  # fmt: skip
def profiles_references(request: Request, who: Viewer) -> ReferencesOut:
    ctx = ctx_of(request)
    known = _profiles(ctx.settings)
    return ReferencesOut(unknown_profile=[r for r in _references(ctx.settings, ctx.store) if r.profile not in known])


@router.get("/api/profiles/{name}", summary="one output profile", description=EDITED_IN_CONFIG, responses={404: {"model": ProblemModel}})
def profiles_get(request: Request, who: Viewer, name: Annotated[str, Path(min_length=1, max_length=64)]) -> ProfileOut:
    ctx = ctx_of(request)
    profiles = _profiles(ctx.settings)
    if name not in profiles:
        raise Problem(404, "No such profile", f"no output profile named {name!r}; known: {', '.join(sorted(profiles))} "
                      "(profiles are defined in the settings file, [output] profiles)")  # fmt: skip
    return _out(ctx.settings, name, profiles[name], _references(ctx.settings, ctx.store))
