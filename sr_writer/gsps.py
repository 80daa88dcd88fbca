"""Grayscale Softcopy Presentation State: the overlay most PACS viewers draw.

Colour in GSPS is per layer, so layers go per colour, top first: WHOLE_IMAGE (a text line per finding
without a box), one FINDING_nn layer per finding (its boxes and label), one REGION_nn layer per region a
finding is grounded to, and ANATOMY (every other region in one switchable layer; the full anatomy is
also in the SEG). Colours come from :mod:`sr_writer.colours`, the same table as the SEG and SC. (The
per-graphic Line/Text Style sequences would allow colour per graphic in fewer layers, but dicom3tools'
GSPS IOD does not list them: the object would become Standard Extended.) Each box is a closed POLYLINE in image
pixels with the same tracking ID/UID as in the SR and SEG. Labels never overlap: each goes in the
first free spot around its box (:func:`sr_writer.overlay.place_labels`), with a visible anchor point
(the viewer draws the leader line) when it had to move away; an anatomy label with no free spot is left
out (the box keeps its tracking ID). Text has no background, so nothing opaque covers the lungs.

A GSPS replaces the viewer's display pipeline, so it must reproduce the source's: the modality LUT and
window (VOI) are copied from the image (highdicom does that when none is given), and a MONOCHROME1
source gets Presentation LUT Shape INVERSE (the default IDENTITY would show it inverted).
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset

from sr_writer.colours import ANATOMY_RGB, WHOLE_IMAGE_FINDINGS_RGB, colour_for_key
from sr_writer.context import Annotation, BundleContext
from sr_writer.equipment import DEVICE_SERIAL_NUMBER, apply_common_attributes
from sr_writer.overlay import place_labels
from sr_writer.text import code_string, truncate
from sr_writer.tid1500 import box_polyline

WHOLE_IMAGE_LAYER = "WHOLE_IMAGE"
ANATOMY_LAYER = "ANATOMY"


def text_height(rows: int) -> float:
    """Label text height: ~2% of the image height, so labels stay readable at fit-to-screen zoom."""
    return max(12.0, rows / 50.0)


def label_boxes(annotations: tuple[Annotation, ...], rows: int, columns: int, taken: list | None = None, always: bool = False) -> list:
    """Per annotation: (bounding box, anchor point or None) for its label, or None when no spot is free.

    ``always`` (findings): a label with no free spot still goes at its box's top-left corner, inside the
    image, even if it overlaps another (on tiny images there is no room for all)."""
    height = text_height(rows)
    boxes = [(int(a.box.x1), int(a.box.y1), int(a.box.x2) - 1, int(a.box.y2) - 1) for a in annotations]
    sizes = [(int(min(columns - 2, max(height, 0.55 * height * len(a.label)))), int(height)) for a in annotations]
    placed, far = place_labels(boxes, sizes, (0, 0, columns - 1, rows - 1), list(range(len(boxes))), taken)
    out = []
    for rect, is_far, annotation in zip(placed, far, annotations):
        if rect is None and always:
            width, height = min(columns - 1, sizes[len(out)][0]), min(rows - 1, sizes[len(out)][1])
            left = min(max(int(annotation.box.x1), 0), columns - 1 - width)
            top = min(max(int(annotation.box.y1), 0), rows - 1 - height)
            rect, is_far = (left, top, left + width, top + height), False
        if rect is None:
            out.append(None)
            continue
        anchor = (float(annotation.box.x1), float(annotation.box.y1)) if is_far else None
        out.append(((float(rect[0]), float(rect[1]), float(rect[2]), float(rect[3])), anchor))
        if taken is not None:
            taken.append(tuple(int(v) for v in rect))
    return out


def whole_image_text_boxes(count: int, rows: int, columns: int) -> list[tuple[float, float, float, float]]:
    """Bounding boxes for findings without a box: stacked lines at the bottom left, inside the image."""
    height = text_height(rows)
    width = columns * 0.6
    return [(4.0, rows - (count - i) * (height + 2.0) - 4.0, 4.0 + width, rows - (count - i) * (height + 2.0) - 4.0 + height) for i in range(count)]


def whole_image_texts(ctx: BundleContext) -> list[hd.pr.TextObject]:
    """One text line per finding the model did not localise ("Pneumothorax 0.04 (whole image)")."""
    unboxed = ctx.unboxed_findings
    texts = []
    for a, box in zip(unboxed, whole_image_text_boxes(len(unboxed), ctx.rows, ctx.columns)):
        text = hd.pr.TextObject(
            text_value=truncate(f"{a.label} (whole image)", "LO"),
            units="PIXEL",
            bounding_box=box,
            text_justification="LEFT",
            tracking_id=a.tracking_id,
            tracking_uid=a.tracking_uid,
        )
        texts.append(text)
    return texts


def graphic_annotation(
    ctx: BundleContext, layer: hd.pr.GraphicLayer, annotations: tuple[Annotation, ...], taken: list, always: bool = False
) -> hd.pr.GraphicAnnotation:
    graphics = []
    for a in annotations:
        graphic = hd.pr.GraphicObject(
            graphic_type="POLYLINE",
            graphic_data=box_polyline(a.box),
            units="PIXEL",
            tracking_id=a.tracking_id,
            tracking_uid=a.tracking_uid,
        )
        graphics.append(graphic)
    texts = []
    for a, placed in zip(annotations, label_boxes(annotations, ctx.rows, ctx.columns, taken, always)):
        if placed is None:
            continue
        bounding_box, anchor = placed
        text = hd.pr.TextObject(
            text_value=a.label,
            units="PIXEL",
            bounding_box=bounding_box,
            anchor_point=anchor,
            anchor_point_visible=anchor is not None,
            text_justification="LEFT",
        )
        texts.append(text)
    return hd.pr.GraphicAnnotation(referenced_images=[ctx.source], graphic_layer=layer, graphic_objects=graphics or None, text_objects=texts or None)


def build_gsps(ctx: BundleContext, kind: str = "gsps") -> Dataset:
    if not ctx.boxed:
        raise ValueError("result has no box inside the image: a presentation state would draw nothing")
    findings = tuple(a for a in ctx.boxed if not a.is_region)
    grounded = ctx.grounded_regions
    anatomy = tuple(a for a in ctx.boxed if a.is_region and a not in grounded)
    # Label spots, findings first: lower layers never put a label over a finding's or the whole-image lines.
    taken: list = [tuple(int(v) for v in box) for box in whole_image_text_boxes(len(ctx.unboxed_findings), ctx.rows, ctx.columns)]
    # One layer per finding and per grounded region (GSPS colour is per layer), then one ANATOMY layer.
    groups: list[tuple[str, str, tuple[int, int, int], tuple[Annotation, ...]]] = []
    for key in dict.fromkeys(a.key.split("-box")[0] for a in findings):
        members = tuple(a for a in findings if a.key.split("-box")[0] == key)
        groups.append((code_string(key.replace("finding-", "FINDING_")), f"Finding: {members[0].label}", colour_for_key(key), members))
    for a in grounded:
        groups.append((code_string(a.key.replace("region-", "REGION_")), f"Grounded anatomy: {a.label}", colour_for_key(a.key), (a,)))
    layers, annotations = [], []
    order = len(groups) + 2
    unboxed_texts = whole_image_texts(ctx)
    if unboxed_texts:
        layer = hd.pr.GraphicLayer(
            layer_name=WHOLE_IMAGE_LAYER,
            order=order,
            description="Findings without a box (AI)",
            display_color=hd.color.CIELabColor.from_rgb(*WHOLE_IMAGE_FINDINGS_RGB),
        )
        layers.append(layer)
        annotations.append(hd.pr.GraphicAnnotation(referenced_images=[ctx.source], graphic_layer=layer, text_objects=unboxed_texts))
    for number, (name, description, rgb, members) in enumerate(groups):
        layer = hd.pr.GraphicLayer(
            layer_name=name, order=order - 1 - number, description=truncate(description, "LO"), display_color=hd.color.CIELabColor.from_rgb(*rgb)
        )
        layers.append(layer)
        annotations.append(graphic_annotation(ctx, layer, members, taken, always=name.startswith("FINDING")))
    if anatomy:
        layer = hd.pr.GraphicLayer(
            layer_name=ANATOMY_LAYER,
            order=1,
            description="All other anatomical regions (AI): switch on for context",
            display_color=hd.color.CIELabColor.from_rgb(*ANATOMY_RGB),
        )
        layers.append(layer)
        annotations.append(graphic_annotation(ctx, layer, anatomy, taken))
    photometric = str(ctx.source.get("PhotometricInterpretation", "MONOCHROME2"))
    shape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[ctx.source],
        **ctx.new_instance_identity(kind),
        manufacturer_model_name=ctx.algorithm_name,
        software_versions=ctx.algorithm_version,
        device_serial_number=DEVICE_SERIAL_NUMBER,
        content_label=code_string("DEMO_WEIGHTS" if ctx.demo else "AI_OVERLAY"),
        content_description=ctx.content_description("boxes overlay"),
        graphic_annotations=annotations,
        graphic_layers=layers,
        institution_name=ctx.institution_name or None,
        presentation_lut_transformation=hd.PresentationLUTTransformation(presentation_lut_shape=shape),
    )
    gsps.SeriesDescription = ctx.series_description(kind)
    gsps.BodyPartExamined = code_string(str(ctx.source.get("BodyPartExamined", "") or "CHEST"))
    return apply_common_attributes(gsps, ctx)
