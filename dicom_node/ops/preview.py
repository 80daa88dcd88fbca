"""The preview image people look at: the demo's ``preview.png`` and the console's overlay preview.

With real weights the preview is the burned-in Secondary Capture the node delivered: findings and the
anatomy they are grounded to. Demo weights find nothing (their language model is random), so that SC
holds no box. For a demo result the preview is drawn here instead, from the source image and the
result: the 36 anatomy regions where the demo APM put them, which is its built-in prior of where each
region usually lies on a PA chest radiograph (not a detection), each in its region colour and labelled
with its name; any finding drawn thick and labelled ``DEMO:``; a banner above the image that says all
this. Nothing here changes the DICOM objects the node sends.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageDraw

from dicom_node.store.base import Store, StudyRecord
from inference.result import AnalysisResult, Box
from sr_writer.colours import BANNER_TEXT_RGB, OUTLINE_RGB, REGION_COLOURS, colour_for_key
from sr_writer.identity import DEMO_MARK
from sr_writer.overlay import Rect, display_pixels, fit_banner, font_for, place_labels, text_size

#: What the boxes of a demo preview are, under the DEMO mark.
DEMO_PRIOR_NOTE = (
    "Boxes: the 36 anatomy regions as the demo model's built-in prior places them "
    "(where each region usually lies on a chest radiograph), not detected in this image."
)
#: Light grey for the banner's explanation lines and the legend title.
NOTE_RGB = (225, 225, 225)


def demo_findings_note(result: AnalysisResult) -> str:
    """The banner's line about findings: none, or how many, all marked DEMO."""
    boxed = sum(1 for finding in result.findings if finding.boxes)
    if not result.findings:
        return "Findings: none (the demo's random language model writes no usable text)."
    return f"Findings: {len(result.findings)} ({boxed} with boxes), labelled DEMO: made by random weights, they mean nothing."


def render_demo_preview(source: pydicom.Dataset, result: AnalysisResult, max_side: int = 1024) -> Image.Image:
    """RGB image, at most ``max_side`` pixels wide or high plus the banner and legend rows: the source as
    a viewer shows it, every located region labelled as the demo prior, findings marked DEMO."""
    gray = display_pixels(source)
    rows, columns = gray.shape
    scale = min(1.0, max_side / max(rows, columns))
    width, height = max(1, round(columns * scale)), max(1, round(rows * scale))
    picture = Image.fromarray(gray).resize((width, height), Image.Resampling.LANCZOS) if scale < 1 else Image.fromarray(gray)

    label_size = max(10, round(min(width, height) / 75))
    stroke = max(1, label_size // 12)
    banner: list[tuple[str, tuple[int, int, int]]] = []
    banner_size = max(10, round(width / 60))
    for text, colour in ((DEMO_MARK, BANNER_TEXT_RGB), (DEMO_PRIOR_NOTE, NOTE_RGB), (demo_findings_note(result), NOTE_RGB)):
        lines, size = fit_banner(text, width, banner_size)
        banner_size = min(banner_size, size)
        banner += [(line, colour) for line in lines]
    line_height = text_size("Agy", banner_size)[1] + 4
    top = len(banner) * line_height + 8

    def rect(box: Box) -> Rect:
        x1, y1 = int(box.x1 * scale), int(box.y1 * scale)
        x2, y2 = min(int(np.ceil(box.x2 * scale)) - 1, width - 1), min(int(np.ceil(box.y2 * scale)) - 1, height - 1)
        return (x1, y1 + top, max(x2, x1), max(y2, y1) + top)

    # (rectangle, label, colour, line width): regions first (thin), findings on top (thick)
    drawn: list[tuple[Rect, str, tuple[int, int, int], int]] = []
    for region in result.regions:
        if region.box is not None and not region.box.is_degenerate():
            drawn.append((rect(region.box), region.name, REGION_COLOURS[region.index], max(1, round(width / 700))))
    for finding in result.findings:
        for box in finding.boxes:
            drawn.append((rect(box), f"DEMO: {finding.label}", colour_for_key(f"finding-{finding.index:02d}"), max(3, round(width / 300))))
    sizes = [(text_size(label, label_size, stroke)[0] + 2, text_size(label, label_size, stroke)[1] + 2) for _, label, _, _ in drawn]
    # findings choose first, then regions from the smallest (a large one has room anywhere)
    area = [(r[2] - r[0]) * (r[3] - r[1]) for r, _, _, _ in drawn]
    regions = sum(1 for region in result.regions if region.box is not None and not region.box.is_degenerate())
    priority = list(range(regions, len(drawn))) + sorted(range(regions), key=lambda i: area[i])
    labels, _ = place_labels([r for r, _, _, _ in drawn], sizes, (0, top, width - 1, top + height - 1), priority)
    legend = [(label, colour) for (_, label, colour, _), spot in zip(drawn, labels) if spot is None]
    legend_size = label_size
    legend_line = text_size("Agy", legend_size)[1] + 4
    legend_top = top + height + 4
    total = legend_top + (len(legend) + 1) * legend_line + 4 if legend else top + height

    canvas = Image.new("RGB", (width, total), (0, 0, 0))
    canvas.paste(picture.convert("RGB"), (0, top))
    draw = ImageDraw.Draw(canvas)
    for number, (line, colour) in enumerate(banner):
        draw.text((4, 4 + number * line_height), line, fill=colour, font=font_for(banner_size))
    for r, _, colour, line_width in drawn:
        draw.rectangle(r, outline=colour, width=line_width)
    font = font_for(label_size)
    for (_, label, colour, _), spot in zip(drawn, labels):
        if spot is not None:
            draw.text((spot[0] + 1, spot[1] + 1), label, fill=colour, font=font, stroke_width=stroke, stroke_fill=OUTLINE_RGB)
    if legend:
        draw.text((4, legend_top), "No room on the image for these labels; their boxes have these colours:", fill=NOTE_RGB, font=font)
        for number, (label, colour) in enumerate(legend, start=1):
            draw.text((4, legend_top + number * legend_line), label, fill=colour, font=font)
    return canvas


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def demo_source_and_result(store: Store, spool_dir: Path, study: StudyRecord) -> tuple[Path, AnalysisResult] | None:
    """The spooled source and the result of the study version's first image analysed with demo
    weights, or None (real weights, nothing analysed yet, or the source already purged)."""
    instances = {i.sop_instance_uid: i for i in store.list_instances(study.study_instance_uid, study.version)}
    for analysis in store.list_analyses(study.study_instance_uid, study.version):
        if not analysis.result_json or analysis.sop_instance_uid not in instances:
            continue
        try:
            result = AnalysisResult.from_json(analysis.result_json)
        except (ValueError, KeyError, TypeError):
            continue
        path = spool_dir / instances[analysis.sop_instance_uid].path
        if result.model.demo and path.is_file():
            return path, result
    return None


def demo_preview_png(store: Store, spool_dir: Path, study: StudyRecord, max_side: int = 1024) -> bytes | None:
    """The console's overlay preview for a study analysed with demo weights (see the module doc)."""
    found = demo_source_and_result(store, spool_dir, study)
    if found is None:
        return None
    path, result = found
    return png_bytes(render_demo_preview(pydicom.dcmread(path), result, max_side))
