"""Render the source image with boxes and labels burned in (for the Secondary Capture).

Display pipeline, as a viewer would do it: stored values -> Modality LUT -> VOI (window or VOI LUT)
-> invert for MONOCHROME1 -> 8 bits -> RGB, then draw with Pillow. The LUTs are applied to a table of
every possible stored value once and the image is mapped through it (one indexing pass over the
pixels instead of float arithmetic per pixel).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from sr_writer.context import Annotation

REGION_RGB = (0, 200, 90)
FINDING_RGB = (255, 64, 64)
LABEL_BACKGROUND = (0, 0, 0)
BANNER_TEXT_RGB = (255, 220, 0)


@dataclass(frozen=True)
class OverlayLayout:
    """Pixel geometry of what is drawn, shared by the renderer and by tests that check its pixels."""

    line_width: int
    font_size: int
    banner_height: int
    #: (left, top, right, bottom) inclusive, one per annotation, in drawing order.
    box_rectangles: tuple[tuple[int, int, int, int], ...]
    label_rectangles: tuple[tuple[int, int, int, int], ...]
    #: Text lines for findings without a box, stacked at the bottom left.
    footer_rectangles: tuple[tuple[int, int, int, int], ...] = ()


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


def layout(annotations: tuple[Annotation, ...], rows: int, columns: int, footer_lines: tuple[str, ...] = ()) -> OverlayLayout:
    """Where boxes, labels and the banner go (sizes scale with the image so labels stay readable)."""
    line_width = max(2, round(min(rows, columns) / 500))
    font_size = max(10, round(rows / 60))
    banner_height = font_size + 2 * max(2, font_size // 4)
    font = font_for(font_size)
    boxes, labels = [], []
    for annotation in annotations:
        box = annotation.box
        left, top = int(np.floor(box.x1)), int(np.floor(box.y1))
        right, bottom = min(int(np.ceil(box.x2)) - 1, columns - 1), min(int(np.ceil(box.y2)) - 1, rows - 1)
        boxes.append((left, top, max(right, left), max(bottom, top)))
        text_left, text_top, text_right, text_bottom = font.getbbox(annotation.label)
        width, height = text_right + 4, text_bottom + 4
        label_left = min(max(left + line_width, 0), max(columns - width, 0))
        label_top = min(max(top + line_width, banner_height), max(rows - height, 0))
        labels.append((label_left, label_top, min(label_left + width, columns - 1), min(label_top + height, rows - 1)))
    footers = []
    line_height = font.getbbox("Agy(|)")[3] + 4  # tallest glyphs and descenders: one height for every line
    for i, line in enumerate(footer_lines):
        text_right = font.getbbox(line)[2]
        top = rows - (len(footer_lines) - i) * line_height - 2
        right = min(columns - 1, text_right + 8)
        footers.append((0, max(top, banner_height), right, max(top, banner_height) + line_height - 1))
    return OverlayLayout(line_width, font_size, banner_height, tuple(boxes), tuple(labels), tuple(footers))


def render_overlay(
    source: pydicom.Dataset, annotations: tuple[Annotation, ...], banner: str, footer_lines: tuple[str, ...] = ()
) -> tuple[np.ndarray, OverlayLayout]:
    """RGB uint8 image, shape (rows, columns, 3), with boxes, labels, a top banner and footer lines."""
    gray = display_pixels(source)
    rows, columns = gray.shape
    geometry = layout(annotations, rows, columns, footer_lines)
    image = Image.fromarray(np.repeat(gray[:, :, np.newaxis], 3, axis=2), mode="RGB")
    draw = ImageDraw.Draw(image)
    font = font_for(geometry.font_size)
    # Regions first, findings last, so findings are never hidden under anatomy.
    order = sorted(range(len(annotations)), key=lambda i: not annotations[i].is_region)
    for i in order:
        colour = REGION_RGB if annotations[i].is_region else FINDING_RGB
        draw.rectangle(geometry.box_rectangles[i], outline=colour, width=geometry.line_width)
    for i in order:
        colour = REGION_RGB if annotations[i].is_region else FINDING_RGB
        rect = geometry.label_rectangles[i]
        draw.rectangle(rect, fill=LABEL_BACKGROUND)
        draw.text((rect[0] + 2, rect[1] + 2), annotations[i].label, fill=colour, font=font)
    for line, rect in zip(footer_lines, geometry.footer_rectangles):
        draw.rectangle(rect, fill=LABEL_BACKGROUND)
        draw.text((rect[0] + 2, rect[1] + 2), line, fill=FINDING_RGB, font=font)
    draw.rectangle((0, 0, columns - 1, geometry.banner_height - 1), fill=LABEL_BACKGROUND)
    draw.text((4, max(1, geometry.font_size // 4)), banner, fill=BANNER_TEXT_RGB, font=font)
    return np.asarray(image), geometry
