"""The burned-in overlay lands where the result says: checked on pixels, and saved as PNG for a look."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from sr_writer.context import make_context
from sr_writer.overlay import FINDING_RGB, REGION_RGB, display_pixels, layout
from tests.sr_writer.conftest import UID_ROOT, BuiltCase


def test_sc_boxes_land_where_the_result_says(case: BuiltCase, output_dir: Path) -> None:
    sc = pydicom.dcmread(case.paths["sc"])
    rgb = sc.pixel_array
    Image.fromarray(rgb).save(output_dir / f"sr_writer-sc-overlay-{case.name}.png")
    annotations = make_context(case.source, case.result, uid_root=UID_ROOT, analysis_version=1).boxed
    context = make_context(case.source, case.result, uid_root=UID_ROOT, analysis_version=1)
    footer = tuple(f"{a.label} (whole image)" for a in context.unboxed_findings)
    assert footer, "the factory result has findings without boxes"
    geometry = layout(annotations, int(sc.Rows), int(sc.Columns), footer)
    width = geometry.line_width
    # The layout's rectangles are the result's boxes (in-image here), independent of the annotation code.
    for region, rect in zip(case.result.regions, geometry.box_rectangles[:36]):
        box = region.box
        assert rect == (int(np.floor(box.x1)), int(np.floor(box.y1)), int(np.ceil(box.x2)) - 1, int(np.ceil(box.y2)) - 1)

    # Everything drawn: box outlines (line_width thick, inward), label rectangles, the banner.
    drawn = np.zeros(rgb.shape[:2], dtype=bool)
    drawn[: geometry.banner_height] = True
    for left, top, right, bottom in geometry.box_rectangles:
        drawn[top : top + width, left : right + 1] = True
        drawn[bottom - width + 1 : bottom + 1, left : right + 1] = True
        drawn[top : bottom + 1, left : left + width] = True
        drawn[top : bottom + 1, right - width + 1 : right + 1] = True
    for left, top, right, bottom in geometry.label_rectangles + geometry.footer_rectangles:
        drawn[top : bottom + 1, left : right + 1] = True
    # The footer lists the unlocalised findings in the finding colour on black.
    for left, top, right, bottom in geometry.footer_rectangles:
        block = rgb[top : bottom + 1, left : right + 1].reshape(-1, 3)
        assert (block == FINDING_RGB).all(axis=1).any() and (block == 0).all(axis=1).mean() > 0.5

    checked = 0
    for annotation, (left, top, right, bottom), label in zip(annotations, geometry.box_rectangles, geometry.label_rectangles):
        colour = np.array(REGION_RGB if annotation.is_region else FINDING_RGB)
        # Middle of each edge, unless a label or another box's line covers that spot.
        for row, column in (((top + bottom) // 2, left), ((top + bottom) // 2, right), (bottom, (left + right) // 2)):
            others = [
                other
                for other, a in zip(geometry.box_rectangles, annotations)
                if other != (left, top, right, bottom) and _on_outline(other, row, column, width)
            ]
            in_label = any(l <= column <= r and t <= row <= b for (l, t, r, b) in geometry.label_rectangles + geometry.footer_rectangles)
            if others or in_label or row < geometry.banner_height:
                continue
            assert np.array_equal(rgb[row, column], colour), f"{annotation.key} edge at ({row}, {column}) is {rgb[row, column]}"
            checked += 1
    assert checked > 40, "too few edges could be checked"

    # Pixels nothing was drawn on are the rendered source, gray (R = G = B), never a box colour.
    undrawn = ~drawn
    assert undrawn.sum() > 0.3 * undrawn.size
    gray = rgb[undrawn]
    assert np.all(gray[:, 0] == gray[:, 1]) and np.all(gray[:, 1] == gray[:, 2])
    expected = display_pixels(case.source)[undrawn]
    assert np.array_equal(gray[:, 0], expected)


def test_monochrome1_is_shown_with_bright_bone(case: BuiltCase) -> None:
    """RG1 (MONOCHROME1) and the DX made by inverting it must render alike: polarity handled."""
    rendered = display_pixels(case.source).astype(float)
    rows, columns = rendered.shape
    spine = rendered[int(rows * 0.4) : int(rows * 0.6), int(columns * 0.48) : int(columns * 0.52)].mean()
    lung = rendered[int(rows * 0.3) : int(rows * 0.5), int(columns * 0.2) : int(columns * 0.3)].mean()
    assert spine > lung + 30, (spine, lung)


def _on_outline(rect: tuple[int, int, int, int], row: int, column: int, width: int) -> bool:
    left, top, right, bottom = rect
    inside = left <= column <= right and top <= row <= bottom
    near_edge = column < left + width or column > right - width or row < top + width or row > bottom - width
    return inside and near_edge
