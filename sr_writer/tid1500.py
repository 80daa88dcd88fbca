"""Comprehensive 3D SR with TID 1500 Measurement Report: the machine-readable record (IHE AIR).

Content tree::

    TID 1500 Imaging Measurement Report
      Procedure Reported: the study's procedure, else LOINC 43468-8 "XR unspecified body region" (CID 100)
      Observer: device (the model, UID = model Device UID)
      Imaging Measurements
        TID 1410 Planar ROI group per finding box and per region box the SR shows (``sr_anatomy``:
        by default only the regions a finding is grounded to; "all": every located region):
          Tracking Identifier / Tracking UID, Finding Type, TID 4019 Algorithm Identification,
          Image Region = closed 5-point POLYLINE SCOORD (column, row), Presence = Present,
          a finding with a probability: NUM "<finding>" (private code, %) with HAS CONCEPT MOD Finding
          Site (+ Laterality); otherwise Finding Site (+ Laterality) at group level,
          TEXT Comment (DCM 121106) = the region's retrieved sentence (region groups, when it has one)
      Qualitative Evaluations (UMLS C0034375, TID 1500 row "Qualitative Evaluations"), when the result
        has image-level labels or findings without a box, or regions were left out:
          TEXT Comment (DCM 121106): what the items are, and how many located regions are left out
            and where they are (the SEG, the GSPS's ANATOMY layer, the text SR's region sentences)
          TEXT per image-level label, sorted by label, named by the label's finding type code:
            "<label>: image-level probability 0.55 (image classifier; not a statement that it is present)"
          TEXT per finding without a box, named by its finding type code:
            "<label>: not localised (whole image); probability 0.04; site ...; model text: ..."

Why image-level labels and unlocalised findings are not measurement groups: OHIF 3.13 (the most used
web viewer) turns every group in Imaging Measurements into a drawable measurement and reads the first
SCOORD's image reference without a guard, so a TID 1501 group with no image reference and no SCOORD
(an image-level probability) crashes its SR viewport ("Something went wrong"). TID 1500's document-level
Qualitative Evaluations container holds exactly such whole-image statements, is valid TID 1500, and
OHIF ignores it (it reads only the Imaging Measurements container). Every fact stays: each label's
probability (two decimals, as everywhere else we show it), each unlocalised finding's label, probability,
sites and text; the text SR lists them too.

Why only the grounded anatomy by default: OHIF draws every measurement group with its label, so 36
region boxes with their labels stacked over each other bury the findings the radiologist opened the
SR for (``test-output/ohif-*-sr.png`` showed it). The SC and the GSPS already follow the rule "anatomy
only where a finding is grounded to it"; the SR now does too, and says in its Qualitative Evaluations
comment how many regions it left out and where the full anatomy is. ``output.sr_anatomy = "all"``
keeps every region for machine readers that want the whole anatomy from the SR alone.

Labels in OHIF: OHIF 3.13 writes beside an SR box one line per NUM of the group ("<concept Code
Meaning>: <value> <unit>") and one for the group's first Finding Site ("363698007: <Code Meaning>"),
nothing else. A finding box's probability NUM is therefore named by the finding (private code per
finding type, :func:`sr_writer.codes.finding_probability_concept`) and carries the finding site as its
own modifier, so the one line reads "Cardiomegaly: 91.00 %" (with DCM 122157 "Probability" and a
group-level site it read "Probability: 0.91 1 / 363698007: Heart"). Groups without a probability (the
regions of ``sr_anatomy`` grounded/all) keep the site at group level; for a paired structure its Code
Meaning carries the side too ("Right costophrenic angle"), code value and laterality modifier unchanged.

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
    ContainerContentItem,
    ContentSequence,
    FindingSite,
    ImageRegion,
    Measurement,
    MeasurementReport,
    ObservationContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset

from inference.result import Box
from sr_writer import codes
from sr_writer._highdicom_compat import attach_content
from sr_writer.context import Annotation, BundleContext, ImageLabel, tracking_uid
from sr_writer.equipment import apply_common_attributes, device_observer
from sr_writer.identity import DEMO_MARK


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
    for annotation in ctx.sr_boxed:
        assert annotation.box is not None  # ctx.sr_boxed holds only annotations with a box
        group = PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=annotation.tracking_uid, identifier=annotation.tracking_id),
            referenced_region=ImageRegion(graphic_type="POLYLINE", graphic_data=box_polyline(annotation.box), source_image=source_image),
            finding_type=annotation.finding_type,
            algorithm_id=algorithm,
            # The sites go with the probability when there is one (see probability_measurements).
            finding_sites=None if annotation.probability is not None else finding_sites(annotation),
            measurements=probability_measurements(annotation),
            qualitative_evaluations=[QualitativeEvaluation(codes.PRESENCE, codes.PRESENT)],
            finding_category=codes.ANATOMICAL_STRUCTURE if annotation.is_region else codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        )
        if annotation.is_region and annotation.text:
            group[0].ContentSequence.append(retrieved_sentence_item(annotation.text))
        groups.append(group)
    if not groups:
        # OHIF 3.13 opens every TID 1500 document in its measurement viewport, which reads the first
        # measurement without a guard: a report with no group crashes it. A normal study therefore gets
        # one group that states the result for the whole analysed image (see whole_image_group).
        groups.append(whole_image_group(ctx, algorithm, source_image))
    observer = device_observer(ctx)
    evaluations = qualitative_evaluations_container(ctx)
    observation_context = ObservationContext(observer_device_context=observer)
    report = MeasurementReport(
        observation_context=observation_context,
        procedure_reported=ctx.procedure_reported(),
        imaging_measurements=groups,
    )
    if evaluations is not None:
        report[0].ContentSequence.append(evaluations)
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
    attach_content(sr, report[0])
    nothing_found = not ctx.finding_boxes and not ctx.unboxed_findings
    sr.SeriesDescription = ctx.series_description(kind, "none" if nothing_found else "")
    return apply_common_attributes(sr, ctx)


IMAGING_MEASUREMENTS = "126010"
#: Tracking identifier of the whole-image group (OHIF lists it in its measurement panel).
NO_FINDING_TRACKING_ID = "No finding detected by AI"
NOT_LOCALISED_TRACKING_ID = "Findings not localised by AI (whole image)"


def whole_image_group(
    ctx: BundleContext, algorithm: AlgorithmIdentification, source_image: SourceImageForRegion
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    """The TID 1410 group of a report that has no box: finding DCM 111286 "No abnormality" when the model
    stated no finding, else SCT 404684003 "Finding" (the unlocalised findings are listed in Qualitative
    Evaluations), finding site the chest, over the region the statement is about (:func:`analysed_region`).

    Valid TID 1500 (a planar ROI group) and what OHIF 3.13 needs to open the report: one drawable
    measurement referencing the source image. A normal study whose image classifier gave a "No finding"
    probability states it as the group's NUM, so OHIF's label reads "No finding: 93.00 %"; without
    one the label is the site, "Chest"."""
    nothing = not ctx.unboxed_findings
    finding_type = codes.NO_ABNORMALITY if nothing else codes.CLINICAL_FINDING
    sites = [FindingSite(anatomic_location=codes.CHEST)]
    no_finding = [label for label in ctx.image_labels if label.finding_type == codes.NO_FINDING] if nothing else []
    measurements = None
    if no_finding:
        name = codes.finding_probability_concept(codes.NO_FINDING, no_finding[0].label)
        measurements = [Measurement(name=name, value=round(100.0 * no_finding[0].probability, 1), unit=codes.PERCENT, finding_sites=sites)]
    key = "whole-image"
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=tracking_uid(ctx.result, ctx.uid_root, ctx.analysis_version, key),
            identifier=NO_FINDING_TRACKING_ID if nothing else NOT_LOCALISED_TRACKING_ID,
        ),
        referenced_region=ImageRegion(graphic_type="POLYLINE", graphic_data=box_polyline(analysed_region(ctx)), source_image=source_image),
        finding_type=finding_type,
        algorithm_id=algorithm,
        finding_sites=None if measurements else sites,
        measurements=measurements,
    )


def analysed_region(ctx: BundleContext) -> Box:
    """Where a whole-image statement is drawn: the lung fields the model located (the box around both
    lungs), else around every located region, else the whole image.

    OHIF puts an SR label to the right of its box, at mid-height: for a box along the image border that
    is past the image's right edge, where the viewport clipped it; the lung fields leave it room."""
    lungs = [a.box for a in ctx.boxed if a.is_region and a.box is not None and a.sites and a.sites[0].structure == codes.LUNG]
    boxes = lungs or [a.box for a in ctx.boxed if a.is_region and a.box is not None]
    if not boxes:
        return Box(0.0, 0.0, float(ctx.columns), float(ctx.rows))
    return Box(min(b.x1 for b in boxes), min(b.y1 for b in boxes), max(b.x2 for b in boxes), max(b.y2 for b in boxes))


def finding_sites(annotation: Annotation) -> list[FindingSite]:
    return [FindingSite(anatomic_location=site_concept(site), laterality=site.laterality) for site in annotation.sites]


def site_concept(site: codes.AnatomicSite) -> hd.sr.CodedConcept:
    """The site's structure code; for a paired structure the Code Meaning names the side (see module docstring)."""
    return hd.sr.CodedConcept(site.structure.value, site.structure.scheme_designator, lateral_meaning(site))


def lateral_meaning(site: codes.AnatomicSite) -> str:
    """ "Right costophrenic angle" for (Costophrenic angle, Right); the plain meaning without laterality."""
    meaning = site.structure.meaning
    if site.laterality is None or site.laterality.meaning.lower() in meaning.lower().split():
        return meaning  # no side, or the meaning already names it ("Left border of cardiac silhouette")
    return f"{site.laterality.meaning} {meaning[:1].lower()}{meaning[1:]}"[:64]


def probability_measurements(annotation: Annotation) -> list[Measurement] | None:
    """TID 300 NUM: the probability (%) that the finding is present in the box, named by the finding
    (:func:`sr_writer.codes.finding_probability_concept`), with the finding sites as its HAS CONCEPT MOD
    Finding Site (TID 300 rows 8-9); only when the model gave a probability."""
    if annotation.probability is None:
        return None
    name = codes.finding_probability_concept(annotation.finding_type, annotation.name or annotation.label)
    value = round(100.0 * annotation.probability, 1)
    return [Measurement(name=name, value=value, unit=codes.PERCENT, finding_sites=finding_sites(annotation) or None)]


def qualitative_evaluations_container(ctx: BundleContext) -> ContainerContentItem | None:
    """TID 1500 "Qualitative Evaluations": image-level labels, unlocalised findings and a note of the
    regions left out of the measurement groups; None when there is none of these."""
    labels, unboxed = ctx.image_labels, ctx.unboxed_findings
    left_out = sum(1 for a in ctx.boxed if a.is_region) - sum(1 for a in ctx.sr_boxed if a.is_region)
    if not labels and not unboxed and not left_out:
        return None
    parts = []
    if left_out:
        parts.append(left_out_regions_text(left_out, sum(1 for a in ctx.sr_boxed if a.is_region)))
    if labels:
        parts.append("image-level probabilities from the model's image classifier (a probability, not a statement that the finding is present)")
    if unboxed:
        parts.append("findings the model stated without locating them on the image")
    note = f"{DEMO_MARK}. " if ctx.demo else ""
    note += "AI output, not verified: " + "; ".join(parts) + "."
    items = [TextContentItem(name=codes.COMMENT, value=note, relationship_type="CONTAINS")]
    items += [TextContentItem(name=label.finding_type, value=image_label_text(label), relationship_type="CONTAINS") for label in labels]
    items += [TextContentItem(name=a.finding_type, value=unboxed_finding_text(a), relationship_type="CONTAINS") for a in unboxed]
    container = ContainerContentItem(name=codes.QUALITATIVE_EVALUATIONS, relationship_type="CONTAINS")
    container.ContentSequence = ContentSequence(items)
    return container


def left_out_regions_text(left_out: int, shown: int) -> str:
    """Why the SR draws fewer regions than the model located, and where they are."""
    which = f"the {shown} a finding is grounded to are" if shown else "none is"
    return (
        f"{left_out} located anatomical regions are not measurement groups here ({which} shown); "
        "the AnatomiX anatomy segmentation (SEG) and presentation state (GSPS ANATOMY layer), where produced, "
        "hold every region's box, and the AnatomiX draft report (text SR) every region's description"
    )


def image_label_text(label: ImageLabel) -> str:
    return f"{label.label}: image-level probability {label.probability:.2f}"


def unboxed_finding_text(annotation: Annotation) -> str:
    parts = [f"{annotation.label.strip()}: not localised (whole image)"]
    if annotation.probability is not None:
        parts.append(f"probability {annotation.probability:.2f}")
    if annotation.sites:
        parts.append("site " + ", ".join(lateral_meaning(site) for site in annotation.sites))
    if annotation.text.strip():
        parts.append(f"model text: {annotation.text.strip()}")
    return "; ".join(parts)


def retrieved_sentence_item(sentence: str) -> TextContentItem:
    """CONTAINS TEXT "Comment": a qualitative evaluation with a text answer (see module docstring)."""
    return TextContentItem(name=codes.COMMENT, value=sentence, relationship_type="CONTAINS")
