"""Basic Text SR (TID 2000): the generated draft report, which most PACS display as text.

highdicom has no Basic Text SR class, so the TID 2000 tree is built from content items, wrapped as
Enhanced SR, and given the Basic Text SR SOP Class (the tree only uses value types Basic Text SR
allows: CONTAINER, TEXT, CODE, UIDREF; no NUM, no SCOORD)::

    CONTAINER Diagnostic Imaging Report (LN 18748-4), TID 2000
      HAS CONCEPT MOD Language of Content Item and Descendants
      HAS OBS CONTEXT Observer Type = Device, Device Observer UID / Name / Manufacturer / Model
      CONTAINER Findings (LN 59776-5): TEXT Finding (DCM 121071)
      CONTAINER Impressions (LN 19005-8): TEXT Impression (DCM 121073)
      CONTAINER AI image classification and region descriptions (99ANATOMIX MODELOUTPUTS), when the
        result has image labels or retrieved sentences:
        TEXT Comment (DCM 121106): what follows (demo warning first for demo weights)
        TEXT Finding per image-level label, highest probability first: "Cardiomegaly: probability 0.91"
        TEXT Finding per region with a retrieved sentence, region order: "Heart: <sentence>"
        (Continuity of Content SEPARATE: a list, one item per line; the two report sections stay
        CONTINUOUS sentences)

The third section's heading is ours because CID 7001 (extensible) has no heading for raw model outputs;
its items use the CID 7002 concept "Finding" like the Findings section, so TID 2000 readers show them
as ordinary report text. No result data, no section: an empty image label dict and no sentences add
nothing.
"""

from __future__ import annotations

import highdicom as hd
from highdicom.sr import (
    ContainerContentItem,
    ContentSequence,
    LanguageOfContentItemAndDescendants,
    ObservationContext,
    TextContentItem,
)
from pydicom.dataset import Dataset

from sr_writer import codes
from sr_writer._highdicom_compat import as_basic_text_sr
from sr_writer.context import BundleContext
from sr_writer.equipment import apply_common_attributes, device_observer
from sr_writer.identity import DEMO_MARK

AI_NOTE = "AI-generated draft, not verified by a radiologist."


def section(title: hd.sr.CodedConcept, item_name: hd.sr.CodedConcept, text: str) -> ContainerContentItem:
    container = ContainerContentItem(name=title, relationship_type="CONTAINS")
    container.ContentSequence = ContentSequence([TextContentItem(name=item_name, value=text, relationship_type="CONTAINS")])
    return container


def model_outputs_section(ctx: BundleContext) -> ContainerContentItem | None:
    """The image-level probabilities and region sentences as TEXT items; None when there are none."""
    lines = model_output_lines(ctx)
    if not lines:
        return None
    prefix = f"{DEMO_MARK}. " if ctx.demo else ""
    parts = []
    if ctx.image_labels:
        parts.append("image-level probabilities from the model's image classifier (a probability, not a statement that the finding is present), highest first")
    if ctx.region_sentences:
        parts.append("the sentence the model retrieved for each anatomical region")
    listed = "; then ".join(parts)
    note = f"{prefix}{AI_NOTE} {listed[:1].upper()}{listed[1:]}."
    # SEPARATE: each item is its own statement, one per line (OHIF and dsr2html run CONTINUOUS items
    # together into one paragraph: 14 probabilities and 36 sentences read as one run-on line).
    container = ContainerContentItem(name=codes.MODEL_OUTPUTS_SECTION, relationship_type="CONTAINS", is_content_continuous=False)
    items = [TextContentItem(name=codes.COMMENT, value=note, relationship_type="CONTAINS")]
    items += [TextContentItem(name=codes.FINDING, value=line, relationship_type="CONTAINS") for line in lines]
    container.ContentSequence = ContentSequence(items)
    return container


def model_output_lines(ctx: BundleContext) -> list[str]:
    """ "<label>: probability 0.91" (descending, then by label) and "<region>: <sentence>" (region order)."""
    labels = sorted(ctx.image_labels, key=lambda label: (-label.probability, label.label))
    lines = [f"{label.label}: probability {label.probability:.2f}" for label in labels]
    lines += [f"{region.name}: {region.sentence}" for region in ctx.region_sentences]
    return lines


def report_texts(ctx: BundleContext) -> tuple[str, str]:
    """(findings, impression) with the AI note, and the demo warning first for demo weights."""
    report = ctx.result.report
    if report is None:
        raise ValueError("result.report is None: the model produced no report, so there is no text SR to build")
    findings = ctx.report_findings if report.findings.strip() else "(no findings text produced)"
    impression = ctx.report_impression if report.impression.strip() else "(no impression produced)"
    prefix = f"{DEMO_MARK}. " if ctx.demo else ""
    return f"{prefix}{AI_NOTE} {findings}", f"{prefix}{impression}"


def build_text_sr(ctx: BundleContext, kind: str = "text_sr") -> Dataset:
    findings_text, impression_text = report_texts(ctx)
    root = ContainerContentItem(name=codes.DIAGNOSTIC_IMAGING_REPORT, template_id="2000")
    items: list = list(LanguageOfContentItemAndDescendants(hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)")))
    observer = device_observer(ctx)
    items.extend(ObservationContext(observer_device_context=observer))
    items.append(section(codes.FINDINGS_SECTION, codes.FINDING, findings_text))
    items.append(section(codes.IMPRESSIONS_SECTION, codes.IMPRESSION, impression_text))
    root.ContentSequence = ContentSequence(items)
    sr = hd.sr.EnhancedSR(
        evidence=[ctx.source],
        content=root,
        **ctx.new_instance_identity(kind),
        institution_name=ctx.institution_name or None,
        is_complete=True,
        is_final=False,  # PRELIMINARY
        is_verified=False,  # UNVERIFIED
    )
    outputs = model_outputs_section(ctx)
    if outputs is not None:
        # Attached after construction, as in tid1500: highdicom's SR constructor deep-copies, re-parses and
        # searches the whole tree: with 14 labels + 36 sentences inside, the text SR took ~0.10 s instead
        # of ~0.02 s on the shared machine (benchmarks/writer.py); attached here, 0.03-0.05 s. The section's
        # items were built and checked by highdicom's content item classes and reference no instance.
        sr.ContentSequence.append(outputs)
    as_basic_text_sr(sr)
    sr.SeriesDescription = ctx.series_description(kind)
    return apply_common_attributes(sr, ctx)
