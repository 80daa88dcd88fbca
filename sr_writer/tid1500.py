"""Comprehensive 3D SR with TID 1500 Measurement Report: the machine-readable record (IHE AIR).

Content tree::

    TID 1500 Imaging Measurement Report
      Procedure Reported: the study's procedure, else LOINC 36554-4
      Observer: device (the model, UID = model Device UID)
      Imaging Measurements
        TID 1410 Planar ROI group per region box and per finding box:
          Tracking Identifier / Tracking UID, Finding Type, TID 4019 Algorithm Identification,
          Finding Site (+ Laterality), Image Region = closed 5-point POLYLINE SCOORD (column, row),
          Presence = Present, Probability (finding, when known)
        TID 1501 group per finding without a box (a whole-image statement)

Comprehensive SR (88.33) holds exactly the same tree, because we use 2D SCOORD only; see
:func:`sr_writer.bundle.comprehensive_sr_fallback`.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    SourceImageForRegion,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes

from inference.result import Box
from sr_writer import codes
from sr_writer.context import Annotation, BundleContext
from sr_writer.equipment import MANUFACTURER, apply_common_attributes


def box_polyline(box: Box) -> np.ndarray:
    """A box as a closed 5-point POLYLINE, shape (5, 2), (column, row), first point = last point."""
    return np.array(
        [[box.x1, box.y1], [box.x2, box.y1], [box.x2, box.y2], [box.x1, box.y2], [box.x1, box.y1]],
        dtype=np.float32,
    )


def build_tid1500_sr(ctx: BundleContext, kind: str = "sr", sr_class: type = hd.sr.Comprehensive3DSR) -> Dataset:
    """The Comprehensive 3D SR for the bundle (``kind`` names its UIDs and series).

    ``sr_class`` may be ``hd.sr.ComprehensiveSR`` (88.33): the tree uses 2D SCOORD only, so it fits.
    """
    algorithm = AlgorithmIdentification(name=ctx.algorithm_name, version=ctx.algorithm_version)
    source_image = SourceImageForRegion.from_source_image(ctx.source)
    groups: list = []
    for annotation in ctx.boxed:
        groups.append(
            PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(uid=annotation.tracking_uid, identifier=annotation.tracking_id),
                referenced_region=ImageRegion(graphic_type="POLYLINE", graphic_data=box_polyline(annotation.box), source_image=source_image),
                finding_type=annotation.finding_type,
                algorithm_id=algorithm,
                finding_sites=finding_sites(annotation),
                measurements=probability_measurements(annotation),
                qualitative_evaluations=[QualitativeEvaluation(codes.PRESENCE, codes.PRESENT)],
                finding_category=codes.ANATOMICAL_STRUCTURE if annotation.is_region else codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
            )
        )
    for annotation in ctx.unboxed_findings:
        groups.append(
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(uid=annotation.tracking_uid, identifier=annotation.tracking_id),
                finding_type=annotation.finding_type,
                algorithm_id=algorithm,
                finding_sites=finding_sites(annotation),
                measurements=probability_measurements(annotation),
                qualitative_evaluations=[QualitativeEvaluation(codes.PRESENCE, codes.PRESENT)],
                finding_category=codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
            )
        )
    model = ctx.result.model
    observer = ObserverContext(
        observer_type=dcm_codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=model.device_uid, name=ctx.algorithm_name, manufacturer_name=MANUFACTURER, model_name=ctx.algorithm_version
        ),
    )
    if not groups:
        raise ValueError("result has no located region and no finding: a TID 1500 report would be empty")
    observation_context = ObservationContext(observer_device_context=observer)
    report = MeasurementReport(
        observation_context=observation_context,
        procedure_reported=ctx.procedure_reported(),
        imaging_measurements=groups,
    )
    # highdicom's SR constructor deep-copies and re-parses the whole tree and searches it for
    # evidence (~1 s for 46 ROI groups). The templates above already validated every item, and the
    # only referenced instance is the source, which is the evidence; so construct the document around
    # the small header-only report and then attach the full content tree.
    skeleton = MeasurementReport(observation_context=observation_context, procedure_reported=ctx.procedure_reported(), imaging_measurements=groups[:1])
    sr = sr_class(
        evidence=[ctx.source],
        content=skeleton[0],
        **ctx.new_instance_identity(kind),
        institution_name=ctx.institution_name or None,
        is_complete=True,  # the algorithm wrote everything it will write
        is_final=False,  # PRELIMINARY: AI output awaits a radiologist
        is_verified=False,  # UNVERIFIED
    )
    for element in report[0]:
        sr[element.tag] = element
    sr.SeriesDescription = ctx.series_description(kind)
    return apply_common_attributes(sr, ctx)


def finding_sites(annotation: Annotation) -> list[FindingSite]:
    return [FindingSite(anatomic_location=site.structure, laterality=site.laterality) for site in annotation.sites]


def probability_measurements(annotation: Annotation) -> list[Measurement] | None:
    """TID 300 "Probability" in [0, 1] (unit "1"), only when the model gave one."""
    if annotation.probability is None:
        return None
    return [Measurement(name=codes.PROBABILITY, value=annotation.probability, unit=codes.NO_UNITS)]
