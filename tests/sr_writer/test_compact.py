"""The full bundle is compact: JPEG-LS Lossless SEG, downscaled JPEG baseline SC (RG1: ~0.5 MB in all, was ~27 MB)."""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.uid import JPEGBaseline8Bit, JPEGLSLossless

from dicom_node.settings import DEFAULT_PROFILES
from sr_writer.bundle import assemble_bundle
from sr_writer.context import make_context
from sr_writer.seg import SEG_UNCOMPRESSED_BUDGET, box_pixel_slice, finding_segments
from tests.sr_writer.conftest import UID_ROOT, BuiltCase, read_seg
from tests.support.results import make_result, rg1_source


def test_full_profile_for_rg1_is_a_fraction_of_what_it_was(tmp_path) -> None:
    source = rg1_source()
    bundle = assemble_bundle(source, make_result(source, n_findings=10), DEFAULT_PROFILES["full"], uid_root=UID_ROOT, analysis_version=1)
    sizes = {}
    for built in bundle.objects:
        path = tmp_path / f"{built.kind}.dcm"
        built.dataset.save_as(path, enforce_file_format=True)
        sizes[built.kind] = path.stat().st_size
    assert set(sizes) >= {"sr", "seg", "gsps", "sc"}, sizes
    # Was ~27 MB (SEG 16-19 MB, SC 11 MB); then 3.8 MB (RLE SEG 2.7 MB, full-size SC 0.95 MB). Target: under 2 MB.
    assert sum(sizes.values()) < 2_000_000, sizes
    assert sizes["seg"] < 300_000 and sizes["sc"] < 400_000, sizes


def test_seg_is_jpeg_ls_pseudo_binary_and_sc_is_jpeg_baseline_and_both_read_back(case: BuiltCase) -> None:
    seg_file = pydicom.dcmread(case.paths["seg"])
    assert seg_file.file_meta.TransferSyntaxUID == JPEGLSLossless
    assert (seg_file.SegmentationType, seg_file.SegmentationFractionalType, seg_file.MaximumFractionalValue) == ("FRACTIONAL", "OCCUPANCY", 255)
    assert set(np.unique(seg_file.pixel_array).tolist()) == {0, 255}  # pseudo-binary: what OHIF reads
    seg = read_seg(case.paths["seg"])
    boxed = [o for o in case.bundle.objects if o.kind == "seg"][0].dataset
    assert seg.number_of_segments == len(boxed.SegmentSequence)
    first = seg.get_pixels_by_source_instance([case.source.SOPInstanceUID], segment_numbers=[1])[0, :, :, 0]
    # The SEG holds the findings' boxes only; segment 1 is the first finding's first box.
    box = next(f.boxes[0] for f in case.result.findings if f.boxes)
    rows, columns = box_pixel_slice(box, case.source.Rows, case.source.Columns)
    assert first[rows, columns].all() and (first > 0).sum() == (rows.stop - rows.start) * (columns.stop - columns.start)
    sc = pydicom.dcmread(case.paths["sc"])
    assert sc.file_meta.TransferSyntaxUID == JPEGBaseline8Bit and sc.PhotometricInterpretation == "YBR_FULL_422"
    pixels = sc.pixel_array
    assert pixels.shape == (sc.Rows, sc.Columns, 3) and np.ptp(pixels) > 100


def test_the_findings_seg_fits_its_uncompressed_budget_by_sharing_the_last_segment() -> None:
    """Each segment is a full-size frame (0.45 MB for RG1 as a BINARY SEG): beyond the budget the most
    probable boxes keep their own segment and the rest share the last, so every box is still drawn."""
    source = rg1_source()
    ctx = make_context(source, make_result(source, n_findings=10), uid_root=UID_ROOT, analysis_version=1)
    frame_bytes = -(-ctx.rows * ctx.columns // 8)
    boxes = ctx.finding_boxes
    assert len(boxes) == 9
    three = finding_segments(ctx, budget=3 * frame_bytes)
    assert len(three) == 3 and sorted(a.key for members in three for a in members) == sorted(a.key for a in boxes)
    probabilities = sorted((a.probability or 0.0 for a in boxes), reverse=True)
    assert sorted(members[0].probability or 0.0 for members in three[:2]) == sorted(probabilities[:2])
    assert len(three[2]) == 7
    assert finding_segments(ctx, budget=20 * frame_bytes) == [(a,) for a in boxes]  # all fit: one each
    seg = assemble_bundle(source, ctx.result, ["seg"], uid_root=UID_ROOT, analysis_version=1).objects[0].dataset
    assert len(seg.SegmentSequence) == SEG_UNCOMPRESSED_BUDGET // frame_bytes == 8
    assert str(seg.SegmentSequence[-1].SegmentLabel) == "Other findings (2)"
    union = seg.pixel_array[-1] > 0  # the last frame holds both least probable boxes
    for annotation in sorted(boxes, key=lambda a: a.probability or 0.0)[:2]:
        rows, columns = box_pixel_slice(annotation.box, ctx.rows, ctx.columns)
        assert union[rows, columns].all()
