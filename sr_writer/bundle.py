"""The bundle API the pipeline calls: build the result objects for one source image.

``build_bundle(source, result, kinds, uid_root=..., analysis_version=...)`` returns the objects in send
order: SR and SEG first, then objects that may reference them (GSPS, SC), the KOS last because it
references all the others. Every UID is derived from (source SOP Instance UID, model Device UID,
analysis version, kind), so building again gives byte-for-byte the same identities.

Delivery fallback (:func:`comprehensive_sr_fallback`): a destination that refuses Comprehensive 3D SR
(88.34) gets the same content as Comprehensive SR (88.33) *with the same SOP Instance UID*. The PACS
must hold one copy of the findings: the 88.33 object is the same document in another SOP class,
sent instead of (never in addition to) the 88.34 one, and a later re-send of either is recognised
by the PACS as the same instance rather than stored twice.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pydicom
from pydicom.uid import Comprehensive3DSRStorage as COMPREHENSIVE_3D_SR
from pydicom.uid import ComprehensiveSRStorage as COMPREHENSIVE_SR

from inference.result import AnalysisResult
from sr_writer.context import BundleContext, make_context
from sr_writer.kinds import KINDS, SEND_ORDER

log = logging.getLogger(__name__)

#: Kind -> builder, read from the kinds table (imported here, once).
_BUILDERS: dict[str, Callable[..., pydicom.Dataset]] = {name: kind.builder() for name, kind in KINDS.items()}


@dataclass(frozen=True)
class BuiltObject:
    """One result instance and the kind that made it ("sr", "seg", ...)."""

    kind: str
    dataset: pydicom.Dataset

    @property
    def sop_class_uid(self) -> str:
        return str(self.dataset.SOPClassUID)

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)


@dataclass(frozen=True)
class Bundle:
    objects: tuple[BuiltObject, ...]
    #: Non-fatal problems: clipped or dropped boxes, kinds skipped because the result lacks their input.
    warnings: tuple[str, ...]


def check_kinds(kinds: Sequence[str]) -> list[str]:
    """The requested kinds in send order; ValueError naming an unknown kind."""
    if isinstance(kinds, str):
        raise ValueError(f"kinds must be a sequence of object kinds, not the string {kinds!r}")
    unknown = [k for k in kinds if k not in SEND_ORDER]
    if unknown:
        raise ValueError(f"kinds contains unknown object kind(s) {', '.join(map(repr, unknown))}; known: {', '.join(SEND_ORDER)}")
    if not kinds:
        raise ValueError("kinds is empty: choose at least one of " + ", ".join(SEND_ORDER))
    return [k for k in SEND_ORDER if k in kinds]


def assemble_bundle(
    source: pydicom.Dataset,
    result: AnalysisResult,
    kinds: Sequence[str],
    *,
    uid_root: str,
    analysis_version: int,
    institution_name: str = "",
    sr_anatomy: str = "findings",
) -> Bundle:
    """Build the requested objects and return them with the warnings (nothing is logged here)."""
    ordered = check_kinds(kinds)
    ctx = make_context(source, result, uid_root=uid_root, analysis_version=analysis_version, institution_name=institution_name, sr_anatomy=sr_anatomy)
    warnings = list(ctx.warnings)
    buildable = []
    referencing = []
    for kind in ordered:
        needs = KINDS[kind].needs
        if needs == "report" and result.report is None:
            warnings.append(f"{kind} skipped: the result has no report")
        elif needs == "boxes" and not ctx.boxed:
            warnings.append(f"{kind} skipped: the result has no box inside the image")
        elif needs == "finding_boxes" and not ctx.finding_boxes:
            pass  # no finding located: nothing to segment (a normal study); not a problem worth a warning
        elif needs == "results":
            referencing.append(kind)
        else:
            buildable.append(kind)
    built = build_objects(ctx, buildable)
    objects = [BuiltObject(kind, built[kind]) for kind in buildable]
    for kind in referencing:  # last in the send order: they reference every object built before
        objects.append(BuiltObject(kind, _BUILDERS[kind](ctx, [o.dataset for o in objects])))
    return Bundle(tuple(objects), tuple(warnings))


def build_objects(ctx: BundleContext, kinds: list[str]) -> dict[str, pydicom.Dataset]:
    """Build ``kinds`` one after the other.

    Overlapping the SEG (numpy, releases the GIL) with the others in a thread was tried: on an idle
    2-core machine it saves ~0.1 s, but it costs ~30% more CPU and is slower on a loaded host (the
    usual case for a worker beside inference), so the builds stay sequential.
    """
    return {kind: _BUILDERS[kind](ctx) for kind in kinds}


def build_bundle(
    source: pydicom.Dataset,
    result: AnalysisResult,
    kinds: Sequence[str],
    *,
    uid_root: str,
    analysis_version: int,
    institution_name: str = "",
    sr_anatomy: str = "findings",
) -> list[BuiltObject]:
    """The result objects for one source image, in send order; warnings are logged (no patient data)."""
    bundle = assemble_bundle(
        source, result, kinds, uid_root=uid_root, analysis_version=analysis_version, institution_name=institution_name, sr_anatomy=sr_anatomy
    )
    for warning in bundle.warnings:
        log.warning("sr_writer: image %s: %s", result.sop_instance_uid, warning)
    return list(bundle.objects)


def comprehensive_sr_fallback(sr_dataset: pydicom.Dataset) -> pydicom.Dataset:
    """The same SR document as Comprehensive SR (88.33), same SOP Instance UID (see module docstring).

    Valid because our TID 1500 content uses 2D SCOORD only; ValueError if it holds SCOORD3D.
    """
    if str(sr_dataset.get("SOPClassUID", "")) not in (COMPREHENSIVE_3D_SR, COMPREHENSIVE_SR):
        raise ValueError(f"sr_dataset has SOP Class {sr_dataset.get('SOPClassUID')!r}; expected Comprehensive 3D SR (88.34)")
    if _has_scoord3d(sr_dataset):
        raise ValueError("sr_dataset contains SCOORD3D content, which Comprehensive SR (88.33) cannot carry")
    fallback = copy.deepcopy(sr_dataset)
    fallback.SOPClassUID = COMPREHENSIVE_SR
    if hasattr(fallback, "file_meta"):
        fallback.file_meta.MediaStorageSOPClassUID = COMPREHENSIVE_SR
    return fallback


def _has_scoord3d(dataset: pydicom.Dataset) -> bool:
    for item in dataset.get("ContentSequence", []):
        if item.get("ValueType") == "SCOORD3D" or _has_scoord3d(item):
            return True
    return False
