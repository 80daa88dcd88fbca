"""Remote DICOM nodes: list, add, change and remove them (admin), and C-ECHO one (operator); validated as ``ae add`` validates.

A DICOMweb destination (``url``) takes its credentials as values (``auth_token``, ``basic_auth``,
``ca_pem``), never as paths: the node keeps them in files of its own (:func:`dicom_node.ops.dicomweb_nodes.write_credentials`)
and never shows them again (``auth`` says which kind is set).
"""

from __future__ import annotations

import re
from dataclasses import asdict, replace
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Request, Response
from pydantic import BaseModel, Field

from dicom_node.api.deps import Admin, Name, Operator, Problem, ProblemModel, Viewer, audit_change, ctx_of
from dicom_node.ops.errors import UserError
from dicom_node.settings import Settings
from dicom_node.store.base import RemoteNode, Store, StoreConflict

router = APIRouter(tags=["nodes"])

NodeRole = Literal["source", "destination", "both"]


#: A host name (labels of 1-63 letters, digits, '-', '_'), an IPv4/IPv6 literal, or '*' (any host, sources only).
HOST_PATTERN = (
    r"^(\*|[0-9]{1,3}(\.[0-9]{1,3}){3}|[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*"
    r"|([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?)$"
)


#: The AE title and the port are checked by the shared validation (``ae add``'s), which says what is
#: wrong in words: a title longer than 16 characters is refused, never cut; a port may come as text.
AE_TITLE_FIELD = Field(min_length=1, max_length=64, description="1-16 printable ASCII characters, no backslash, not all spaces")
PORT_FIELD = Field(description="the DICOM port, 1-65535 (a number, or its digits as text)")


URL_TEXT = "a DICOMweb destination: its base URL (results by STOW-RS, echo by QIDO-RS); host and port come from it, the AE title is optional"
TOKEN_TEXT = "with url: the bearer token (write-only; kept in a file of the node's own)"
BASIC_TEXT = "with url: user:password for HTTP basic authentication (write-only)"
CA_TEXT = "with an https url: PEM CA certificates trusted for its certificate"


class NodeIn(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    ae_title: str | None = Field(default=None, min_length=0, max_length=64, description=AE_TITLE_FIELD.description)
    host: str | None = Field(default=None, min_length=1, max_length=253, pattern=HOST_PATTERN)
    port: int | Annotated[str, Field(max_length=32)] | None = Field(default=None, description=PORT_FIELD.description)
    role: NodeRole = "destination"
    url: str | None = Field(default=None, max_length=2048, description=URL_TEXT)
    auth_token: str | None = Field(default=None, max_length=8192, description=TOKEN_TEXT)
    basic_auth: str | None = Field(default=None, max_length=1024, description=BASIC_TEXT)
    ca_pem: str | None = Field(default=None, max_length=262144, description=CA_TEXT)
    profile: str | None = Field(default=None, max_length=64, description="an output profile (GET /api/profiles); default: output.default_profile")
    quiet_period_s: float | None = Field(default=None, ge=0, le=86400)
    complete_on_release: bool = False
    default_destination: bool = False
    tls_client_certificate: Literal["optional", "required"] | None = Field(
        default=None, description="as a source: required = its associations are refused unless it presents a trusted client "
        "certificate on the DICOM TLS port (default optional: the port's own rule)")  # fmt: skip


class NodePatch(BaseModel):
    url: str | None = Field(default=None, max_length=2048, description=f'{URL_TEXT}; "" makes it a DIMSE node again')
    auth_token: str | None = Field(default=None, max_length=8192, description=f'{TOKEN_TEXT}; "" removes it')
    basic_auth: str | None = Field(default=None, max_length=1024, description=f'{BASIC_TEXT}; "" removes it')
    ca_pem: str | None = Field(default=None, max_length=262144, description=f'{CA_TEXT}; "" removes it')
    ae_title: str | None = Field(default=None, min_length=1, max_length=64, description=AE_TITLE_FIELD.description)
    host: str | None = Field(default=None, min_length=1, max_length=253, pattern=HOST_PATTERN)
    port: int | Annotated[str, Field(max_length=32)] | None = Field(default=None, description=PORT_FIELD.description)
    role: NodeRole | None = None
    profile: str | None = Field(default=None, max_length=64)
    quiet_period_s: float | None = Field(default=None, ge=0, le=86400)
    complete_on_release: bool | None = None
    default_destination: bool | None = None
    tls_client_certificate: Literal["optional", "required"] | None = Field(
        default=None, description="as a source: required = its associations are refused unless it presents a trusted client "
        "certificate on the DICOM TLS port (default optional: the port's own rule)")  # fmt: skip


class DestinationHealthOut(BaseModel):
    name: str
    configured: bool = Field(description="false: a destination removed since, with deliveries left")
    default_destination: bool
    state: Literal["down", "failing", "ok", "unused"] = Field(
        description="down: the last attempt failed and objects are waiting; failing: it failed, nothing waiting; unused: never tried"
    )
    last_success_at: str | None
    last_failure_at: str | None
    last_failure_reason: str | None
    waiting: int = Field(description="objects still to send (pending or retrying)")
    given_up: int = Field(description="objects dead-lettered or refused for good (only a resend sends them)")
    next_attempt_at: str | None


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
    url: str | None = Field(default=None, description="a DICOMweb destination's base URL (None: DIMSE)")
    auth: Literal["bearer", "basic"] | None = Field(default=None, description="a DICOMweb destination's authentication (the secret is never shown)")
    ca_file: bool = Field(default=False, description="a DICOMweb destination has its own CA certificates")
    health: DestinationHealthOut | None = Field(default=None, description="a destination's health (GET /api/destinations)")
    warnings: list[str] = Field(default_factory=list, description="after a change: e.g. a destination that will receive no results")


class DestinationsOut(BaseModel):
    destinations: list[DestinationHealthOut]
    results_go_nowhere: str | None = Field(description="set when no destination would get any study's results, with how to fix it")
    undelivered_studies: int = Field(description="studies done whose results went to no destination")


class EchoIn(BaseModel):
    timeout_s: float | None = Field(default=None, gt=0, le=60)


class EchoOut(BaseModel):
    node: str
    success: bool
    rtt_ms: float | None
    error: str | None


def node_out(node: RemoteNode, **extra: Any) -> NodeOut:
    """A node as the API shows it: its DICOMweb credentials only by kind."""
    auth: Literal["bearer", "basic"] | None = "bearer" if node.auth_token_file else "basic" if node.basic_auth_file else None
    return NodeOut(**asdict(node), auth=auth, ca_file=bool(node.url and node.tls_ca_file), **extra)


@router.get("/api/nodes", summary="remote DICOM nodes (a destination with its health)")
def list_nodes(request: Request, who: Viewer) -> list[NodeOut]:
    store = ctx_of(request).store
    health = _health(store)
    return [node_out(n, health=health.get(n.name) if n.is_destination else None) for n in store.list_remote_nodes()]


@router.get("/api/nodes/{name}", responses={404: {"model": ProblemModel}})
def get_node(request: Request, who: Viewer, name: Name) -> NodeOut:
    store = ctx_of(request).store
    node = _require_node(store, name)
    return node_out(node, health=_health(store).get(node.name) if node.is_destination else None)


@router.get("/api/destinations", summary="each destination's health: last success, last failure and why, objects waiting, next try")
def destinations(request: Request, who: Viewer) -> DestinationsOut:
    from dicom_node.ops.remotes import where_results_go

    store = ctx_of(request).store
    _, nowhere = where_results_go(store.list_remote_nodes(), store.list_routing_rules())
    return DestinationsOut(destinations=list(_health(store).values()), results_go_nowhere=nowhere,
                           undelivered_studies=store.count_undelivered_studies())  # fmt: skip


def _health(store: Store) -> dict[str, DestinationHealthOut]:
    from dicom_node.ops.remotes import destination_health

    return {row["name"]: DestinationHealthOut(**row) for row in destination_health(store)}


def _unreached(store: Store, node: RemoteNode) -> list[str]:
    from dicom_node.ops.remotes import unreached_destination_warning

    warning = unreached_destination_warning(node, store.list_routing_rules())
    return [warning] if warning else []


@router.post("/api/nodes", status_code=201, summary="add a remote node (admin)",
             responses={409: {"model": ProblemModel}})  # fmt: skip
def add_node(request: Request, who: Admin, body: NodeIn) -> NodeOut:
    ctx = ctx_of(request)
    values = body.model_dump()
    _no_secrets_without_url(body.url, values)
    if body.url is not None:
        _validated_node(ctx.settings, values)  # the name and the URL first: the name names the credential files
        values.update(_credentials(ctx.settings, body.name, values))
    node = replace(_validated_node(ctx.settings, values), tls_client_certificate=body.tls_client_certificate or "optional")
    try:
        ctx.store.add_remote_node(node)
    except StoreConflict:
        raise Problem(409, "Node exists", f"a remote node named {node.name!r} already exists") from None
    audit_change(request, who, "node_added", node.name, after=asdict(node))
    return node_out(node, warnings=_unreached(ctx.store, node))


@router.patch("/api/nodes/{name}", summary="change some settings of a remote node (admin)",
              responses={404: {"model": ProblemModel}})  # fmt: skip
def update_node(request: Request, who: Admin, name: Name, body: NodePatch) -> NodeOut:
    ctx = ctx_of(request)
    current = _require_node(ctx.store, name)
    changes = body.model_dump(exclude_unset=True)
    merged = {**asdict(current), **{k: v for k, v in changes.items() if v is not None or k in ("quiet_period_s", "profile")}}
    merged["ca_file"] = current.tls_ca_file if current.url else None
    if "url" in changes and changes["url"] != current.url:  # a new URL brings its host and port; "" makes it a DIMSE node
        merged.update(url=changes["url"] or None, host=changes.get("host"), port=changes.get("port"))
        if not changes["url"]:
            merged.update(auth_token_file=None, basic_auth_file=None, ca_file=None)
    _no_secrets_without_url(merged.get("url"), changes)
    if merged.get("url"):
        _validated_node(ctx.settings, {**merged, "auth_token_file": None, "basic_auth_file": None, "ca_file": None})
        merged.update(_credentials(ctx.settings, name, changes))
    node = _validated_node(ctx.settings, merged)
    if not node.url:
        tls_kept = {k: getattr(current, k) for k in ("tls", "tls_ca_file", "tls_cert_file", "tls_key_file", "tls_verify_peer", "tls_check_hostname")}
        node = replace(node, **tls_kept)
    node = replace(node, tls_client_certificate=changes.get("tls_client_certificate") or current.tls_client_certificate)
    if node != current:
        ctx.store.update_remote_node(node)
        before = {k: v for k, v in asdict(current).items() if getattr(node, k) != v}
        audit_change(request, who, "node_updated", name, before=before, after={k: getattr(node, k) for k in before})
    return node_out(node, warnings=_unreached(ctx.store, node))


@router.delete("/api/nodes/{name}", status_code=204, summary="remove a remote node (admin)",
               responses={404: {"model": ProblemModel}})  # fmt: skip
def remove_node(request: Request, who: Admin, name: Name) -> Response:
    store = ctx_of(request).store
    node = _require_node(store, name)
    store.remove_remote_node(name)
    audit_change(request, who, "node_removed", name, before=asdict(node))
    return Response(status_code=204)


@router.post("/api/nodes/{name}/echo", summary="C-ECHO the node (operator): result and round-trip time",
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


def _require_node(store: Store, name: str) -> RemoteNode:
    node = store.get_remote_node(name)
    if node is None:
        raise Problem(404, "No such node", f"no remote node named {name!r} (GET /api/nodes lists them)")
    return node


#: The validation names the credential files by the body fields that carried their contents.
SECRET_LABELS = {"auth_token_file": "auth_token", "basic_auth_file": "basic_auth", "ca_file": "ca_pem"}


def _no_secrets_without_url(url: str | None, values: dict[str, Any]) -> None:
    given = [k for k in ("auth_token", "basic_auth", "ca_pem") if values.get(k)]
    if given and not url:
        message = f"{given[0]}: only for a DICOMweb node; give its base URL in url"
        raise Problem(422, "Invalid request", message, errors=[{"where": f"body.{given[0]}", "message": message}])


def _credentials(settings: Settings, name: str, values: dict[str, Any]) -> dict[str, Any]:
    """The DICOMweb secrets of a request body kept in the node's own files: the path fields to validate with
    (a given secret replaces the other kind; "" removes it)."""
    from dicom_node.ops.dicomweb_nodes import write_credentials

    given = {k: values.get(k) for k in ("auth_token", "basic_auth", "ca_pem")}
    fields: dict[str, Any] = {}
    if given["auth_token"] is not None:  # a token replaces a basic auth; "" removes the token
        fields["auth_token_file" if given["auth_token"] == "" else "basic_auth_file"] = None
    if given["basic_auth"] is not None:
        fields["basic_auth_file" if given["basic_auth"] == "" else "auth_token_file"] = None
    if given["ca_pem"] == "":
        fields["ca_file"] = None
    try:
        fields.update(write_credentials(settings, name, **{k: v for k, v in given.items() if v}))
    except UserError as exc:
        raise Problem(422, "Invalid request", str(exc), errors=[{"where": "body", "message": str(exc)}]) from None
    return fields


def _validated_node(settings: Settings, values: dict[str, Any]) -> RemoteNode:
    """The shared remote node validation (as for ``ae add``); its errors, naming the field, as 422."""
    from dicom_node.ops.remotes import validated_remote_node

    try:
        return validated_remote_node(
            settings, name=values["name"], ae_title=values.get("ae_title") or "", host=values.get("host") or "", port=values.get("port"),
            role=values["role"], profile=values.get("profile"), quiet_period_s=values.get("quiet_period_s"),
            complete_on_release=bool(values.get("complete_on_release")), default_destination=bool(values.get("default_destination")),
            url=values.get("url"), auth_token_file=values.get("auth_token_file"), basic_auth_file=values.get("basic_auth_file"),
            ca_file=values.get("ca_file"), labels=SECRET_LABELS,
        )  # fmt: skip
    except UserError as exc:
        message = str(exc)
        field = re.match(r"\w+", message)
        where = f"body.{field.group(0)}" if field and field.group(0) in values else "body"
        raise Problem(422, "Invalid request", message, errors=[{"where": where, "message": message}]) from None
