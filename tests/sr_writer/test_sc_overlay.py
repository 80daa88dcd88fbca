"""The burned-in overlay: findings and their anatomy where the result says, in the shared colours, labels
apart, banner and legend outside the image; checked on pixels, and saved as PNG for a look."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from sr_writer.bundle import assemble_bundle
from sr_writer.colours import colour_for_key
from sr_writer.context import grounded_annotations, make_context
from sr_writer.overlay import BANNER_TEXT_RGB, display_pixels, layout, render_overlay, text_size
from sr_writer.sc import SC_MAX_SIDE, banner_text, downscale, footer_lines
from tests.sr_writer.conftest import UID_ROOT, BuiltCase
from tests.sr_writer.corpus_inputs import CorpusCase, make_source
from tests.support.results import make_result


def geometry_for(case_source: pydicom.Dataset, result) -> tuple:
    ctx = make_context(case_source, result, uid_root=UID_ROOT, analysis_version=1)
    return ctx, layout(ctx.annotations, ctx.rows, ctx.columns, banner_text(ctx), footer_lines(ctx))


def test_sc_draws_findings_and_their_anatomy_where_the_result_says(case: BuiltCase, output_dir: Path) -> None:
    sc = pydicom.dcmread(case.paths["sc"])
    Image.fromarray(sc.pixel_array).save(output_dir / f"sr_writer-sc-overlay-{case.name}.png")
    ctx, geometry = geometry_for(case.source, case.result)
    # Exact pixel checks on the rendering; the SC stores it downscaled to at most SC_MAX_SIDE and JPEG
    # baseline, so it is only close to the downscaled rendering.
    rgb, _ = render_overlay(ctx.source, ctx.annotations, banner_text(ctx), footer_lines(ctx))
    stored = downscale(rgb)
    assert sc.pixel_array.shape == stored.shape and max(stored.shape[:2]) <= SC_MAX_SIDE
    assert np.abs(sc.pixel_array.astype(int) - stored.astype(int)).mean() < 6
    drawn = grounded_annotations(ctx.annotations)
    assert [a.is_region for a in drawn].count(False) == len([a for a in ctx.boxed if not a.is_region])  # every finding box
    grounded = {site for a in ctx.annotations if not a.is_region for site in a.sites}
    assert {a.sites[0] for a in drawn if a.is_region} == grounded - {None}  # anatomy only where a finding is grounded
    assert (geometry.total_rows, ctx.columns) == rgb.shape[:2]
    scale = min(1.0, SC_MAX_SIDE / max(geometry.total_rows, ctx.columns))
    assert (int(sc.Rows), int(sc.Columns)) == (round(geometry.total_rows * scale), round(ctx.columns * scale))
    top = geometry.image_top
    assert top == geometry.banner_height > 0 and geometry.legend_top >= top + ctx.rows  # banner and legend outside the image

    covered = np.zeros(rgb.shape[:2], dtype=bool)
    width = geometry.line_width
    for annotation, (left, t, right, bottom) in zip(drawn, geometry.box_rectangles):
        w = width if annotation.is_region else 2 * width
        covered[t : t + w, left : right + 1] = covered[bottom - w + 1 : bottom + 1, left : right + 1] = True
        covered[t : bottom + 1, left : left + w] = covered[t : bottom + 1, right - w + 1 : right + 1] = True
    for label in geometry.label_rectangles:
        if label is not None:
            covered[label[1] : label[3] + 3, label[0] : label[2] + 3] = True
    for leader in geometry.leaders:
        if leader is not None:
            (x0, y0), (x1, y1) = leader
            covered[min(y0, y1) - 2 : max(y0, y1) + 3, min(x0, x1) - 2 : max(x0, x1) + 3] = True

    checked = 0
    for annotation, (left, t, right, bottom) in zip(drawn, geometry.box_rectangles):
        colour = np.array(colour_for_key(annotation.key))
        for row, column in (((t + bottom) // 2, left), ((t + bottom) // 2, right), (bottom, (left + right) // 2)):
            owners = [a for a, r in zip(drawn, geometry.box_rectangles) if r[0] <= column <= r[2] and r[1] <= row <= r[3] and a is not annotation]
            in_label = any(lr is not None and lr[0] <= column <= lr[2] + 2 and lr[1] <= row <= lr[3] + 2 for lr in geometry.label_rectangles)
            if owners or in_label:
                continue
            assert np.array_equal(rgb[row, column], colour), f"{annotation.key} edge at ({row}, {column}) is {rgb[row, column]}"
            checked += 1
    assert checked >= len(drawn) // 2, "too few edges could be checked"

    # Image pixels nothing was drawn on are the rendered source, unchanged (the image is not shifted or covered).
    image = rgb[top : top + ctx.rows]
    free = ~covered[top : top + ctx.rows]
    assert free.mean() > 0.8  # nothing opaque: labels are outlined text, no panels over the lungs
    expected = display_pixels(case.source)
    assert np.array_equal(image[free][:, 0], expected[free]) and np.array_equal(image[free][:, 1], expected[free])


def test_labels_never_overlap_and_stay_in_the_image(case: BuiltCase) -> None:
    ctx, geometry = geometry_for(case.source, case.result)
    placed = [r for r in geometry.label_rectangles if r is not None]
    assert len(placed) >= len(geometry.label_rectangles) - 2
    for a, b in combinations(placed, 2):
        assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1], (a, b)
    for left, top, right, bottom in placed:
        assert 0 <= left and right < ctx.columns and geometry.image_top <= top and bottom < geometry.image_top + ctx.rows


def test_the_banner_is_whole_on_a_256_px_wide_image(tmp_path: Path, output_dir: Path) -> None:
    case = CorpusCase("40_330x256_2_8b_DX_explicit_clean", 330, 256, "MONOCHROME2", 8, "DX", "explicit", "valid", "clean")
    source = pydicom.dcmread(make_source(case, tmp_path))
    result = make_result(source, n_findings=8)
    sc = assemble_bundle(source, result, ("sc",), uid_root=UID_ROOT, analysis_version=1).objects[0].dataset
    Image.fromarray(sc.pixel_array).save(output_dir / "sr_writer-sc-banner-256px.png")
    ctx, geometry = geometry_for(source, result)
    rgb, _ = render_overlay(ctx.source, ctx.annotations, banner_text(ctx), footer_lines(ctx))  # before JPEG
    assert sc.pixel_array.shape == rgb.shape  # small: not downscaled
    assert " ".join(geometry.banner_lines) == banner_text(ctx)  # every word is there
    banner = rgb[: geometry.banner_height]
    yellow = np.all(np.abs(banner.astype(int) - BANNER_TEXT_RGB) < 60, axis=2)
    columns_with_text = np.flatnonzero(yellow.any(axis=0))
    assert columns_with_text.size and columns_with_text.max() < 256 - 2  # nothing runs off the right edge
    line_height = (geometry.banner_height - 6) // len(geometry.banner_lines)
    for number, line in enumerate(geometry.banner_lines):  # each line is drawn, as wide as its text
        band = yellow[3 + number * line_height : 3 + (number + 1) * line_height]
        drawn_columns = np.flatnonzero(band.any(axis=0))
        assert drawn_columns.size, line
        assert abs((drawn_columns.max() - 4) - text_size(line, geometry.banner_font_size)[0]) <= 6, line
    assert geometry.banner_font_size >= 9


@pytest.mark.parametrize("kind", ["seg", "gsps"])
def test_one_colour_per_region_and_finding_across_seg_gsps_and_sc(case: BuiltCase, kind: str) -> None:
    import highdicom as hd

    ctx = make_context(case.source, case.result, uid_root=UID_ROOT, analysis_version=1)
    by_uid = {a.tracking_uid: a for a in ctx.boxed}
    if kind == "seg":
        colours = {}
        for item in [*case.dataset("seg").SegmentSequence, *case.dataset("anatomy_seg").SegmentSequence]:
            annotation = by_uid[item.TrackingUID]
            expected = hd.color.CIELabColor.from_rgb(*colour_for_key(annotation.key)).value
            assert tuple(item.RecommendedDisplayCIELabValue) == tuple(expected), annotation.key
            colours.setdefault(annotation.key.split("-box")[0], tuple(expected))
        regions = [v for k, v in colours.items() if k.startswith("region")]
        assert len(set(regions)) == 36  # every region its own colour
        assert len(set(colours.values())) == len(colours)
    else:
        gsps = case.dataset("gsps")
        layer_colour = {item.GraphicLayer: tuple(item.GraphicLayerRecommendedDisplayCIELabValue) for item in gsps.GraphicLayerSequence}
        for annotation_item in gsps.GraphicAnnotationSequence:
            layer = annotation_item.GraphicLayer
            if layer in ("ANATOMY", "WHOLE_IMAGE"):
                continue
            for graphic in annotation_item.get("GraphicObjectSequence", []):
                annotation = by_uid[graphic.TrackingUID]
                assert layer_colour[layer] == tuple(hd.color.CIELabColor.from_rgb(*colour_for_key(annotation.key)).value), layer


def test_monochrome1_is_shown_with_bright_bone(case: BuiltCase) -> None:
    """RG1 (MONOCHROME1) and the DX made by inverting it must render alike: polarity handled."""
    rendered = display_pixels(case.source).astype(float)
    rows, columns = rendered.shape
    spine = rendered[int(rows * 0.4) : int(rows * 0.6), int(columns * 0.48) : int(columns * 0.52)].mean()
    lung = rendered[int(rows * 0.3) : int(rows * 0.5), int(columns * 0.2) : int(columns * 0.3)].mean()
    assert spine > lung + 30, (spine, lung)


def test_a_normal_study_sc_says_the_ai_found_nothing(tmp_path: Path, output_dir: Path) -> None:
    """A study with no finding: the SC states it under the image, in the legend's colour (not only the banner)."""
    from tests.sr_writer.shapes import build_shapes

    [shape] = [s for s in build_shapes(tmp_path, kinds=("sc",)) if s.shape.findings == "0"][:1]
    ctx = make_context(shape.source, shape.result, uid_root=UID_ROOT, analysis_version=1)
    assert not grounded_annotations(ctx.annotations) and not ctx.unboxed_findings
    assert footer_lines(ctx) == ("No finding detected by AI",)
    sc = pydicom.dcmread(shape.paths["sc"])
    Image.fromarray(sc.pixel_array).save(output_dir / "sr_writer-sc-overlay-normal-study.png")
    rgb, _ = render_overlay(ctx.source, ctx.annotations, banner_text(ctx), footer_lines(ctx))
    without, _ = render_overlay(ctx.source, ctx.annotations, banner_text(ctx), ())
    assert rgb.shape[0] > without.shape[0]  # the statement has its own line below the image
