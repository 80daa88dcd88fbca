"""Grayscale Softcopy Presentation State: the overlay most PACS viewers draw.

Two graphic layers, each with its own colour (colour is per layer in GSPS): ANATOMY (regions, green)
and FINDINGS (findings, red, drawn on top). Each box is a closed POLYLINE in image pixels with the
same tracking ID/UID as in the SR and SEG, and a text label placed inside the image, at the box's
top-left corner. Findings without a box are listed as text lines at the bottom left of the FINDINGS
layer ("Pneumothorax 0.04 (whole image)"), with their tracking UIDs.

A GSPS replaces the viewer's display pipeline, so it must reproduce the source's: the modality LUT and
window (VOI) are copied from the image (highdicom does that when none is given), and a MONOCHROME1
source gets Presentation LUT Shape INVERSE (the default IDENTITY would show it inverted).
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset

from sr_writer.context import Annotation, BundleContext
from sr_writer.equipment import DEVICE_SERIAL_NUMBER, apply_common_attributes
from sr_writer.text import code_string, truncate
from sr_writer.tid1500 import box_polyline

ANATOMY_LAYER = "ANATOMY"
FINDINGS_LAYER = "FINDINGS"
ANATOMY_RGB = (0, 200, 90)
FINDINGS_RGB = (255, 64, 64)


def label_bounding_box(annotation: Annotation, rows: int, columns: int) -> tuple[float, float, float, float]:
    """Where the label text goes: (left, top, right, bottom) in pixels, inside the box and the image.

    Text height is ~2% of the image height, so labels stay readable at fit-to-screen zoom; a label
    near the right or bottom edge is shifted so its box stays in the image (GSPS forbids outside points).
    """
    box = annotation.box
    height = max(12.0, rows / 50.0)
    width = min(columns - 1.0, max(height, 0.55 * height * len(annotation.label)))
    left = min(max(box.x1 + 2.0, 0.0), columns - width - 1.0)
    top = min(max(box.y1 + 2.0, 0.0), rows - height - 1.0)
    return (max(left, 0.0), max(top, 0.0), max(left, 0.0) + width, max(top, 0.0) + height)


def whole_image_text_boxes(count: int, rows: int, columns: int) -> list[tuple[float, float, float, float]]:
    """Bounding boxes for findings without a box: stacked lines at the bottom left, inside the image."""
    height = max(12.0, rows / 50.0)
    width = columns * 0.6
    return [(4.0, rows - (count - i) * (height + 2.0) - 4.0, 4.0 + width, rows - (count - i) * (height + 2.0) - 4.0 + height) for i in range(count)]


def whole_image_texts(ctx: BundleContext) -> list[hd.pr.TextObject]:
    """One text line per finding the model did not localise ("Pneumothorax 0.04 (whole image)")."""
    unboxed = ctx.unboxed_findings
    return [
        hd.pr.TextObject(
            text_value=truncate(f"{a.label} (whole image)", "LO"),
            units="PIXEL",
            bounding_box=box,
            text_justification="LEFT",
            tracking_id=a.tracking_id,
            tracking_uid=a.tracking_uid,
        )
        for a, box in zip(unboxed, whole_image_text_boxes(len(unboxed), ctx.rows, ctx.columns))
    ]


def graphic_annotation(ctx: BundleContext, layer: hd.pr.GraphicLayer, annotations: tuple[Annotation, ...], extra_texts: list | None = None) -> hd.pr.GraphicAnnotation:
    graphics = [
        hd.pr.GraphicObject(
            graphic_type="POLYLINE",
            graphic_data=box_polyline(a.box),
            units="PIXEL",
            tracking_id=a.tracking_id,
            tracking_uid=a.tracking_uid,
        )
        for a in annotations
    ]
    texts = [
        hd.pr.TextObject(
            text_value=a.label,
            units="PIXEL",
            bounding_box=label_bounding_box(a, ctx.rows, ctx.columns),
            text_justification="LEFT",
        )
        for a in annotations
    ] + list(extra_texts or [])
    return hd.pr.GraphicAnnotation(referenced_images=[ctx.source], graphic_layer=layer, graphic_objects=graphics or None, text_objects=texts)


def build_gsps(ctx: BundleContext, kind: str = "gsps") -> Dataset:
    regions = tuple(a for a in ctx.boxed if a.is_region)
    findings = tuple(a for a in ctx.boxed if not a.is_region)
    if not regions and not findings:
        raise ValueError("result has no box inside the image: a presentation state would draw nothing")
    layers = [
        hd.pr.GraphicLayer(layer_name=ANATOMY_LAYER, order=1, description="Anatomical regions (AI)", display_color=hd.color.CIELabColor.from_rgb(*ANATOMY_RGB)),
        hd.pr.GraphicLayer(layer_name=FINDINGS_LAYER, order=2, description="Findings (AI)", display_color=hd.color.CIELabColor.from_rgb(*FINDINGS_RGB)),
    ]
    annotations = []
    if regions:
        annotations.append(graphic_annotation(ctx, layers[0], regions))
    unboxed_texts = whole_image_texts(ctx)
    if findings or unboxed_texts:
        annotations.append(graphic_annotation(ctx, layers[1], findings, unboxed_texts))
    photometric = str(ctx.source.get("PhotometricInterpretation", "MONOCHROME2"))
    shape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[ctx.source],
        **ctx.new_instance_identity(kind),
        manufacturer_model_name=ctx.algorithm_name,
        software_versions=ctx.algorithm_version,
        device_serial_number=DEVICE_SERIAL_NUMBER,
        content_label=code_string("DEMO_WEIGHTS" if ctx.demo else "AI_OVERLAY"),
        content_description=ctx.content_description("regions and findings overlay"),
        graphic_annotations=annotations,
        graphic_layers=layers,
        institution_name=ctx.institution_name or None,
        presentation_lut_transformation=hd.PresentationLUTTransformation(presentation_lut_shape=shape),
    )
    gsps.SeriesDescription = ctx.series_description(kind)
    gsps.BodyPartExamined = code_string(str(ctx.source.get("BodyPartExamined", "") or "CHEST"))
    return apply_common_attributes(gsps, ctx)
