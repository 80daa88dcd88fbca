"""The node as a DICOMweb source (PS3.18): QIDO-RS searches and WADO-RS retrieves under ``/dicomweb``.

They serve what the node holds: the received instances and the result objects of each study
(:mod:`dicom_node.dicomweb.catalog`), so a viewer (OHIF) or a remote analyze worker reads them from
the node itself. Every route needs an account with the ``viewer`` role: an API token
(``Authorization: Bearer axn_...``) or a console session cookie. Errors are problem details: 400 for
a malformed UID, frame list or query parameter, 404 for a study, series, instance or frame the node
does not hold, 406 for an Accept header the node cannot satisfy.
Retrieves and metadata reads of a study or series are audited (who, which study), frames are not
(a viewer asks for them one by one after reading the series' metadata, which is audited).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response, StreamingResponse

from dicom_node.api.auth import Principal
from dicom_node.api.deps import Problem, Viewer, client_host, ctx_of
from dicom_node.audit.trail import Peer
from dicom_node.dicomweb import qido, wado
from dicom_node.dicomweb.catalog import StoredObject, series_of, servable_study, study_objects
from dicom_node.store.spool import is_valid_uid

router = APIRouter(tags=["dicomweb"])
ROOT = "/dicomweb"
#: Audit event of a WADO-RS retrieve or metadata read (who read which study over DICOMweb).
DICOMWEB_RETRIEVED = "dicomweb_retrieved"

Uid = Annotated[str, Path(description="a DICOM UID (malformed: 400)")]
DICOM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {'multipart/related; type="application/dicom"': {}}, "description": "the objects, one part each"},
    400: {"description": "a malformed UID or parameter"},
    401: {"description": "no or bad credentials"},
    403: {"description": "a session that must first change its one-time password"},
    404: {"description": "the node holds no such study, series, instance or frame"},
    406: {"description": "the Accept header asks for a media type or transfer syntax the node cannot send"},
}
JSON_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {wado.DICOM_JSON: {}}, "description": "DICOM JSON (PS3.18 F.2)"},
    400: DICOM_RESPONSES[400],
    401: DICOM_RESPONSES[401],
    403: DICOM_RESPONSES[403],
    404: DICOM_RESPONSES[404],
}


# ---- QIDO-RS -----------------------------------------------------------------------------------------------


@router.get(f"{ROOT}/studies", summary="QIDO-RS: search for studies", responses=JSON_RESPONSES)
def search_studies(request: Request, who: Viewer) -> Response:
    ctx = ctx_of(request)
    query = _query(request)
    return _json(qido.search_studies(ctx.store, ctx.settings, query, _base(request)))


@router.get(f"{ROOT}/studies/{{study}}/series", summary="QIDO-RS: search for the series of a study", responses=JSON_RESPONSES)
def search_series(request: Request, who: Viewer, study: Uid) -> Response:
    objects = _study(request, study)
    return _json(qido.search_series(objects, _query(request), _base(request)))


@router.get(f"{ROOT}/studies/{{study}}/instances", summary="QIDO-RS: search for the instances of a study", responses=JSON_RESPONSES)
def search_study_instances(request: Request, who: Viewer, study: Uid) -> Response:
    objects = _study(request, study)
    return _json(qido.search_instances(objects, _query(request), _base(request)))


@router.get(f"{ROOT}/studies/{{study}}/series/{{series}}/instances", summary="QIDO-RS: search for the instances of a series",
            responses=JSON_RESPONSES)  # fmt: skip
def search_series_instances(request: Request, who: Viewer, study: Uid, series: Uid) -> Response:
    objects = _series(request, study, series)
    return _json(qido.search_instances(objects, _query(request), _base(request)))


# ---- WADO-RS: instances ------------------------------------------------------------------------------------


@router.get(f"{ROOT}/studies/{{study}}", summary="WADO-RS: retrieve a study's instances and results", responses=DICOM_RESPONSES)
def retrieve_study(request: Request, who: Viewer, study: Uid) -> Response:
    objects = _study(request, study)
    return _retrieve(request, who, study, objects, single=False)


@router.get(f"{ROOT}/studies/{{study}}/series/{{series}}", summary="WADO-RS: retrieve a series", responses=DICOM_RESPONSES)
def retrieve_series(request: Request, who: Viewer, study: Uid, series: Uid) -> Response:
    objects = _series(request, study, series)
    return _retrieve(request, who, study, objects, single=False, series=series)


@router.get(f"{ROOT}/studies/{{study}}/series/{{series}}/instances/{{instance}}", summary="WADO-RS: retrieve one instance",
            responses=DICOM_RESPONSES)  # fmt: skip
def retrieve_instance(request: Request, who: Viewer, study: Uid, series: Uid, instance: Uid) -> Response:
    obj = _instance(request, study, series, instance)
    return _retrieve(request, who, study, [obj], single=True, series=series)


def _retrieve(request: Request, who: Principal, study: str, objects: list[StoredObject], single: bool, series: str | None = None) -> Response:
    try:
        choice = wado.choose_instance_media(wado.parse_accept(request.headers.get("accept")), single)
        wado.check_transcodable(objects, choice.transfer_syntax)
    except wado.NotAcceptable as exc:
        raise Problem(406, "Not Acceptable", str(exc)) from None
    _audit(request, who, study, "retrieve", len(objects), series=series, sop_instance_uid=objects[0].sop_instance_uid if single else None)
    if not choice.multipart:
        [obj] = objects
        return StreamingResponse(wado.instance_bytes(obj, choice.transfer_syntax), media_type=wado.dicom_part_type(obj, choice.transfer_syntax))
    boundary = wado.new_boundary()
    parts = ((wado.dicom_part_type(o, choice.transfer_syntax), wado.instance_bytes(o, choice.transfer_syntax)) for o in objects)
    return StreamingResponse(wado.multipart_body(parts, boundary), media_type=wado.multipart_type(wado.DICOM, boundary))


# ---- WADO-RS: metadata -------------------------------------------------------------------------------------


@router.get(f"{ROOT}/studies/{{study}}/metadata", summary="WADO-RS: the metadata of a study's instances and results", responses=JSON_RESPONSES)
def study_metadata(request: Request, who: Viewer, study: Uid) -> Response:
    objects = _study(request, study)
    _audit(request, who, study, "metadata", len(objects))
    return _json([wado.metadata_json(o, _instance_url(request, o)) for o in objects])


@router.get(f"{ROOT}/studies/{{study}}/series/{{series}}/metadata", summary="WADO-RS: the metadata of a series", responses=JSON_RESPONSES)
def series_metadata(request: Request, who: Viewer, study: Uid, series: Uid) -> Response:
    objects = _series(request, study, series)
    _audit(request, who, study, "metadata", len(objects), series=series)
    return _json([wado.metadata_json(o, _instance_url(request, o)) for o in objects])


@router.get(f"{ROOT}/studies/{{study}}/series/{{series}}/instances/{{instance}}/metadata", summary="WADO-RS: the metadata of one instance",
            responses=JSON_RESPONSES)  # fmt: skip
def instance_metadata(request: Request, who: Viewer, study: Uid, series: Uid, instance: Uid) -> Response:
    obj = _instance(request, study, series, instance)
    return _json([wado.metadata_json(obj, _instance_url(request, obj))])


# ---- WADO-RS: frames and bulk data -------------------------------------------------------------------------


@router.get(f"{ROOT}/studies/{{study}}/series/{{series}}/instances/{{instance}}/frames/{{frames}}",
            summary="WADO-RS: frames of an instance (stored or decoded)", responses=DICOM_RESPONSES)  # fmt: skip
def retrieve_frames(request: Request, who: Viewer, study: Uid, series: Uid, instance: Uid,
                    frames: Annotated[str, Path(max_length=4096)]) -> Response:  # fmt: skip
    try:
        numbers = wado.parse_frame_list(frames)
    except ValueError as exc:
        raise Problem(400, "Bad frame list", str(exc)) from None
    return _frames(request, _instance(request, study, series, instance), numbers)


@router.get(f"{ROOT}/studies/{{study}}/series/{{series}}/instances/{{instance}}/bulkdata/{{tag}}",
            summary="WADO-RS: bulk data of an instance (its pixel data: every frame)", responses=DICOM_RESPONSES)  # fmt: skip
def retrieve_bulkdata(request: Request, who: Viewer, study: Uid, series: Uid, instance: Uid, tag: Annotated[str, Path(max_length=8)]) -> Response:
    obj = _instance(request, study, series, instance)
    if tag.upper() != wado.PIXEL_DATA_TAG or not wado.has_pixel_data(obj.header()):
        raise Problem(404, "No such bulk data", f"instance {instance} has no bulk data {tag}: only its pixel data ({wado.PIXEL_DATA_TAG}) is served")
    return _frames(request, obj, list(range(1, wado.frame_count(obj.header()) + 1)))


def _frames(request: Request, obj: StoredObject, numbers: list[int]) -> Response:
    if not wado.has_pixel_data(obj.header()):
        raise Problem(404, "No pixel data", f"instance {obj.sop_instance_uid} ({obj.sop_class_uid}) has no frames")
    try:
        syntax = wado.choose_frame_syntax(wado.parse_accept(request.headers.get("accept")), obj.transfer_syntax_uid)
        frames = wado.read_frames(obj, numbers, syntax)
    except wado.NotAcceptable as exc:
        raise Problem(406, "Not Acceptable", str(exc)) from None
    except wado.NoSuchFrame as exc:
        raise Problem(404, "No such frame", str(exc)) from None
    boundary = wado.new_boundary()
    parts = ((wado.frame_part_type(syntax), [frame]) for frame in frames)
    return Response(b"".join(wado.multipart_body(parts, boundary)), media_type=wado.multipart_type(wado.frame_part_type(syntax), boundary))


# ---- shared ------------------------------------------------------------------------------------------------


def _check_uid(value: str, what: str) -> None:
    if not is_valid_uid(value):
        raise Problem(400, "Malformed UID", f"{what} {value!r} is not a DICOM UID (digits and dots, at most 64 characters)")


def _study(request: Request, study: str) -> list[StoredObject]:
    _check_uid(study, "StudyInstanceUID")
    ctx = ctx_of(request)
    objects = study_objects(ctx.store, ctx.settings, study) if servable_study(ctx.store, study) else []
    if not objects:
        raise Problem(404, "No such study", f"the node holds no study {study}")
    return objects


def _series(request: Request, study: str, series: str) -> list[StoredObject]:
    _check_uid(series, "SeriesInstanceUID")
    objects = series_of(_study(request, study)).get(series)
    if not objects:
        raise Problem(404, "No such series", f"study {study} has no series {series} on the node")
    return objects


def _instance(request: Request, study: str, series: str, instance: str) -> StoredObject:
    _check_uid(instance, "SOPInstanceUID")
    for obj in _series(request, study, series):
        if obj.sop_instance_uid == instance:
            return obj
    raise Problem(404, "No such instance", f"series {series} of study {study} has no instance {instance} on the node")


def _query(request: Request) -> qido.Query:
    try:
        return qido.parse_query(list(request.query_params.multi_items()))
    except qido.BadQuery as exc:
        raise Problem(400, "Bad query", str(exc)) from None


def _base(request: Request) -> str:
    """The DICOMweb root as the client reached it (path only: right behind a proxy of the same path)."""
    return request.scope.get("root_path", "") + ROOT


def _instance_url(request: Request, obj: StoredObject) -> str:
    return f"{_base(request)}/studies/{obj.study_instance_uid}/series/{obj.series_instance_uid}/instances/{obj.sop_instance_uid}"


def _json(body: Any) -> Response:
    return Response(json.dumps(body, separators=(",", ":")).encode(), media_type=wado.DICOM_JSON)


def _audit(request: Request, who: Principal, study: str, what: str, count: int, series: str | None = None,
           sop_instance_uid: str | None = None) -> None:  # fmt: skip
    ctx_of(request).trail.record(DICOMWEB_RETRIEVED, Peer(None, None, client_host(request)), study_instance_uid=study,
                                 sop_instance_uid=sop_instance_uid, user=who.user, via=who.via, what=what, objects=count,
                                 series=series)  # fmt: skip
