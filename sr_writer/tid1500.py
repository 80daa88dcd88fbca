"""Comprehensive 3D SR with TID 1500 Measurement Report: the machine-readable record (IHE AIR).

Content tree::

    TID 1500 Imaging Measurement Report
      Procedure Reported: the study's procedure, else LOINC 36554-4
      Observer: device (the model, UID = model Device UID)
      Imaging Measurements
        TID 1410 Planar ROI group per region box and per finding box:
          Tracking Identifier / Tracking UID, Finding Type, TID 4019 Algorithm Identification,
          Finding Site (+ Laterality), Image Region = closed 5-point POLYLINE SCOORD (column, row),
          Presence = Present, Probability (finding, when known),
          TEXT Comment (DCM 121106) = the region's retrieved sentence (region groups, when it has one)
        TID 1501 group per finding without a box (a whole-image statement)
        TID 1501 group per image-level classification label, sorted by label:
          Tracking Identifier "image-label <label>" / Tracking UID, Finding Type (the label's code),
          TID 4019 Algorithm Identification, TID 300 Probability (DCM 122157, UCUM "1")

Image-level labels carry no Finding Category, no Finding Site and no Presence evaluation: a
probability from the image classifier is not a statement that the finding is present. Their tracking
identifier prefix "image-label" and the missing Presence tell them apart from grounded findings
(which have Presence = Present and category Morphologically Abnormal Structure). All labels the
model scored are written (14 small groups), so a reader also sees the low ones.

The retrieved sentence is a free-text description of the region, so it cannot be a CODE (a code value
is at most 16 characters and must come from a scheme). The qualitative evaluation rows of TID 1410 /
TID 1501 ($QualType, "coded questions with coded or text answers") allow a CONTAINS TEXT item with a
coded name; we name it DCM 121106 "Comment". DCM 121071 "Finding" was the other candidate: the
validators treat both alike, but "Finding" is already the name of the group's CODE finding type
(row 3b), which readers such as highdicom and OHIF look up by concept name, so a TEXT of the same
name invites mix-ups. highdicom 0.28's ``QualitativeEvaluation`` takes only codes, so the item is
appended to the group's content sequence by hand, after the coded evaluations. dciodvfy and dsrdump
accept it; pixelmed's 2022 template tables have no qualitative evaluation rows for TID 1410 at all
(the same gap as for "Presence of property"), so it reports the item as "not in template": a
documented false positive, limited to this concept name, in ``tests/sr_writer/false_positives.py``.

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
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes

from inference.result import Box
from sr_writer import codes
from sr_writer.context import Annotation, BundleContext, ImageLabel
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
        group = PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=annotation.tracking_uid, identifier=annotation.tracking_id),
            referenced_region=ImageRegion(graphic_type="POLYLINE", graphic_data=box_polyline(annotation.box), source_image=source_image),
            finding_type=annotation.finding_type,
            algorithm_id=algorithm,
            finding_sites=finding_sites(annotation),
            measurements=probability_measurements(annotation),
            qualitative_evaluations=[QualitativeEvaluation(codes.PRESENCE, codes.PRESENT)],
            finding_category=codes.ANATOMICAL_STRUCTURE if annotation.is_region else codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        )
        if annotation.is_region and annotation.text:
            group[0].ContentSequence.append(retrieved_sentence_item(annotation.text))
        groups.append(group)
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
    groups.extend(image_label_group(label, algorithm) for label in ctx.image_labels)
    model = ctx.result.model
    observer = ObserverContext(
        observer_type=dcm_codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=model.device_uid, name=ctx.algorithm_name, manufacturer_name=MANUFACTURER, model_name=ctx.algorithm_version
        ),
    )
    if not groups:
        raise ValueError("result has no located region, no finding and no image label: a TID 1500 report would be empty")
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


def image_label_group(label: ImageLabel, algorithm: AlgorithmIdentification) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 whole-image group for one image-level label: finding type and its probability only."""
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=label.tracking_uid, identifier=label.tracking_id),
        finding_type=label.finding_type,
        algorithm_id=algorithm,
        measurements=[Measurement(name=codes.PROBABILITY, value=label.probability, unit=codes.NO_UNITS)],
    )


def retrieved_sentence_item(sentence: str) -> TextContentItem:
    """CONTAINS TEXT "Comment": a qualitative evaluation with a text answer (see module docstring)."""
    return TextContentItem(name=codes.COMMENT, value=sentence, relationship_type="CONTAINS")
