"""Render the source image with findings (and the anatomy they are grounded to) burned in, for the SC.

Display pipeline, as a viewer would do it: stored values -> Modality LUT -> VOI (window or VOI LUT)
-> invert for MONOCHROME1 -> 8 bits -> RGB, then draw with Pillow. The LUTs are applied to a table of
every possible stored value once and the image is mapped through it (one indexing pass over the
pixels instead of float arithmetic per pixel).

What a radiologist reads first: findings, thick and in saturated colours; the anatomy a finding is
grounded to, thin and muted; nothing else (the full anatomy is in the SEG and in the GSPS's ANATOMY
layer). Labels never overlap: each is placed in the first free spot around its box, with a leader line
when it had to move away; a label with no free spot goes to the legend below the image. Text has a
dark outline instead of an opaque background, so nothing opaque covers the lungs. The banner and the
legend lines are in rows added above and below the image, and the banner is fitted to any width
(smaller font, then wrapped), so a 256-px-wide image shows all of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from sr_writer.colours import BANNER_TEXT_RGB, OUTLINE_RGB, WHOLE_IMAGE_FINDINGS_RGB, colour_for_key
from sr_writer.context import Annotation, grounded_annotations

MIN_FONT = 9

Rect = tuple[int, int, int, int]  # left, top, right, bottom (inclusive)


@dataclass(frozen=True)
class OverlayLayout:
    """Pixel geometry of what is drawn, shared by the renderer and by tests that check its pixels.

    Rectangles are in output pixels: the image starts at row ``image_top`` (after the banner rows).
    """

    line_width: int
    font_size: int
    banner_lines: tuple[str, ...]
    banner_font_size: int
    banner_height: int
    image_top: int
    rows: int  # of the source image
    columns: int
    #: (left, top, right, bottom) inclusive, one per drawn annotation, in drawing order (output pixels).
    box_rectangles: tuple[Rect, ...]
    #: Where each drawn annotation's label went; None when it went to the legend.
    label_rectangles: tuple[Rect | None, ...]
    #: Leader line per label: ((x0, y0), (x1, y1)) or None when the label touches its box.
    leaders: tuple[tuple[tuple[int, int], tuple[int, int]] | None, ...]
    #: Legend lines below the image: labels without a free spot, then findings without a box.
    legend_lines: tuple[str, ...]
    legend_colours: tuple[tuple[int, int, int], ...]
    legend_top: int
    legend_line_height: int
    legend_font_size: int

    @property
    def total_rows(self) -> int:
        return self.legend_top + len(self.legend_lines) * self.legend_line_height + (4 if self.legend_lines else 0)


def display_pixels(source: pydicom.Dataset) -> np.ndarray:
    """8-bit display values, shape (rows, columns), bright = white on screen."""
    stored = source.pixel_array
    if stored.ndim != 2:
        raise ValueError(f"source pixel data has shape {stored.shape}; expected one grayscale frame")
    if np.issubdtype(stored.dtype, np.integer) and stored.dtype.itemsize <= 2:
        offset = int(stored.min())
        table_in = np.arange(offset, int(stored.max()) + 1, dtype=np.int64)
        table = voi_output(table_in, source)
        values = table[stored.astype(np.int64) - offset] if offset else table[stored]
    else:
        values = voi_output(stored.astype(np.float64), source)
    low, high = float(values.min()), float(values.max())
    scaled = np.zeros(stored.shape, dtype=np.uint8) if high <= low else ((values - low) * (255.0 / (high - low))).astype(np.uint8)
    if str(source.get("PhotometricInterpretation", "MONOCHROME2")) == "MONOCHROME1":
        scaled = 255 - scaled
    return scaled


def voi_output(values: np.ndarray, source: pydicom.Dataset) -> np.ndarray:
    """Modality LUT then VOI (first window / VOI LUT), as float values in the VOI output range."""
    modality = apply_modality_lut(values, source)
    if "WindowCenter" in source or "VOILUTSequence" in source:
        return np.asarray(apply_voi_lut(modality, source, index=0), dtype=np.float64)
    return np.asarray(modality, dtype=np.float64)


def font_for(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def text_size(text: str, size: int, stroke: int = 0) -> tuple[int, int]:
    left, top, right, bottom = font_for(size).getbbox(text, stroke_width=stroke)
    return right, bottom


def fit_banner(text: str, columns: int, preferred: int) -> tuple[tuple[str, ...], int]:
    """(lines, font size) so that every line fits ``columns`` minus margins: shrink, then wrap words."""
    room = max(columns - 8, 8)
    size = preferred
    while size > MIN_FONT and text_size(text, size)[0] > room:
        size -= 1
    if text_size(text, size)[0] <= room:
        return (text,), size
    lines: list[str] = []
    for word in text.split():
        if lines and text_size(f"{lines[-1]} {word}", size)[0] <= room:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return tuple(lines), size


def _overlaps(a: Rect, b: Rect, margin: int = 2) -> bool:
    return not (a[2] + margin < b[0] or b[2] + margin < a[0] or a[3] + margin < b[1] or b[3] + margin < a[1])


def place_labels(
    boxes: list[Rect], sizes: list[tuple[int, int]], bounds: Rect, priority: list[int], occupied: list[Rect] | None = None
) -> tuple[list[Rect | None], list[bool]]:
    """A rectangle per label that overlaps no other label and stays in ``bounds``; None when none is free.

    Candidates, in order: just inside the box's top-left corner, just above it, just below the box,
    inside the bottom-left corner, right of the box, left of it; then spots further away on rings around
    the box (those need a leader line: the second list says which).
    """
    placed: list[Rect] = list(occupied or [])
    out: list[Rect | None] = [None] * len(boxes)
    leader = [False] * len(boxes)
    for i in priority:
        left, top, right, bottom = boxes[i]
        width, height = sizes[i]
        candidates = [
            (left + 3, top + 3, False),
            (left, top - height - 2, False),
            (left, bottom + 2, False),
            (left + 3, bottom - height - 3, False),
            (right + 2, top, False),
            (left - width - 2, top, False),
        ]
        for ring in range(1, 7):
            step = ring * (height + 4)
            for dx, dy in ((0, -1), (1, -1), (1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1)):
                candidates.append((left + dx * step, top + dy * step, True))
        for x, y, far in candidates:
            rect = (int(x), int(y), int(x) + width, int(y) + height)
            if rect[0] < bounds[0] or rect[1] < bounds[1] or rect[2] > bounds[2] or rect[3] > bounds[3]:
                continue
            if any(_overlaps(rect, other) for other in placed):
                continue
            placed.append(rect)
            out[i] = rect
            leader[i] = far
            break
    return out, leader


def layout(annotations: tuple[Annotation, ...], rows: int, columns: int, banner: str, footer_lines: tuple[str, ...] = ()) -> OverlayLayout:
    """Where boxes, labels, leader lines, the banner and the legend go (sizes scale with the image)."""
    drawn = grounded_annotations(annotations)  # anatomy first, findings on top
    base = max(10, round(min(rows, columns * 1.2) / 55))
    line_width = max(2, round(min(rows, columns) / 400))
    banner_lines, banner_size = fit_banner(banner, columns, base)
    banner_line_height = text_size("Agy", banner_size)[1] + 4
    banner_height = len(banner_lines) * banner_line_height + 6
    image_top = banner_height
    font_size = base
    stroke = max(1, font_size // 12)
    boxes = []
    for annotation in drawn:
        box = annotation.box
        left, top = int(np.floor(box.x1)), int(np.floor(box.y1))
        right, bottom = min(int(np.ceil(box.x2)) - 1, columns - 1), min(int(np.ceil(box.y2)) - 1, rows - 1)
        boxes.append((left, top + image_top, max(right, left), max(bottom, top) + image_top))
    sizes = [tuple(v + 2 for v in text_size(a.label, font_size, stroke)) for a in drawn]
    # Findings get the best spots; then regions.
    priority = [i for i, a in enumerate(drawn) if not a.is_region] + [i for i, a in enumerate(drawn) if a.is_region]
    labels, far = place_labels(boxes, sizes, (0, image_top, columns - 1, image_top + rows - 1), priority)
    leaders = []
    for box, label, is_far in zip(boxes, labels, far):
        if label is None or not is_far:
            leaders.append(None)
            continue
        anchor = (min(max(box[0], label[0]), box[2]), min(max(box[1], label[1]), box[3]))
        start = (min(max(anchor[0], label[0]), label[2]), min(max(anchor[1], label[1]), label[3]))
        leaders.append((start, anchor))
    legend = [a.label for a, label in zip(drawn, labels) if label is None] + list(footer_lines)
    legend_colours = [colour_for_key(a.key) for a, label in zip(drawn, labels) if label is None]
    legend_colours += [WHOLE_IMAGE_FINDINGS_RGB] * len(footer_lines)
    legend_size = font_size
    while legend and legend_size > MIN_FONT and max(text_size(line, legend_size)[0] for line in legend) > columns - 8:
        legend_size -= 1
    return OverlayLayout(
        line_width=line_width,
        font_size=font_size,
        banner_lines=banner_lines,
        banner_font_size=banner_size,
        banner_height=banner_height,
        image_top=image_top,
        rows=rows,
        columns=columns,
        box_rectangles=tuple(boxes),
        label_rectangles=tuple(labels),
        leaders=tuple(leaders),
        legend_lines=tuple(legend),
        legend_colours=tuple(legend_colours),
        legend_top=image_top + rows + 2,
        legend_line_height=text_size("Agy", legend_size)[1] + 4,
        legend_font_size=legend_size,
    )


def render_overlay(
    source: pydicom.Dataset, annotations: tuple[Annotation, ...], banner: str, footer_lines: tuple[str, ...] = ()
) -> tuple[np.ndarray, OverlayLayout]:
    """RGB uint8 image, shape (banner + rows + legend, columns, 3): the image with findings and the
    anatomy they are grounded to, the banner in added rows above, the legend in added rows below."""
    gray = display_pixels(source)
    rows, columns = gray.shape
    geometry = layout(annotations, rows, columns, banner, footer_lines)
    drawn = grounded_annotations(annotations)  # anatomy first, findings on top
    canvas = np.zeros((geometry.total_rows, columns, 3), dtype=np.uint8)
    canvas[geometry.image_top : geometry.image_top + rows] = gray[:, :, np.newaxis]
    image = Image.fromarray(canvas, mode="RGB")
    draw = ImageDraw.Draw(image)
    font = font_for(geometry.font_size)
    stroke = max(1, geometry.font_size // 12)
    for annotation, rect in zip(drawn, geometry.box_rectangles):
        width = geometry.line_width if annotation.is_region else 2 * geometry.line_width
        draw.rectangle(rect, outline=colour_for_key(annotation.key), width=width)
    for annotation, label, leader in zip(drawn, geometry.label_rectangles, geometry.leaders):
        if label is None:
            continue
        colour = colour_for_key(annotation.key)
        if leader is not None:
            draw.line(leader, fill=colour, width=max(1, geometry.line_width // 2))
        draw.text((label[0] + 1, label[1] + 1), annotation.label, fill=colour, font=font, stroke_width=stroke, stroke_fill=OUTLINE_RGB)
    banner_font = font_for(geometry.banner_font_size)
    line_height = (geometry.banner_height - 6) // max(len(geometry.banner_lines), 1)
    for number, line in enumerate(geometry.banner_lines):
        draw.text((4, 3 + number * line_height), line, fill=BANNER_TEXT_RGB, font=banner_font)
    legend_font = font_for(geometry.legend_font_size)
    for number, (line, colour) in enumerate(zip(geometry.legend_lines, geometry.legend_colours)):
        draw.text((4, geometry.legend_top + number * geometry.legend_line_height), line, fill=colour, font=legend_font)
    return np.asarray(image), geometry
