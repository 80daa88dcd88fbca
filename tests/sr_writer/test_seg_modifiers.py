"""SEG segments keep the laterality of paired structures, read back from the written file.

A left and a right lung zone are the same structure code; only the laterality modifier tells them
apart (DICOM post-coordination, as in the SR's finding sites). Regions carry it on the segmented
property type (SegmentedPropertyTypeModifierCodeSequence), findings on their anatomic region
(AnatomicRegionModifierSequence). Checked segment by segment against the annotations, against the
codes table (every paired region, both sides), and against the SR of the same bundle.
"""

from __future__ import annotations

import highdicom as hd
import pydicom

from sr_writer import codes
from sr_writer.context import make_context
from tests.sr_writer.conftest import UID_ROOT, BuiltCase, group_sites


def coded(item: pydicom.Dataset) -> tuple[str, str]:
    return (str(item.CodeValue), str(item.CodingSchemeDesignator))


def code_of(code) -> tuple[str, str]:
    return (str(code.value), str(code.scheme_designator))


def modifiers(item: pydicom.Dataset, keyword: str) -> list[tuple[str, str]]:
    return [coded(m) for m in item.get(keyword, [])]


def segments(case: BuiltCase) -> list:
    """The segments of the findings SEG and of the anatomy SEG, read from the files as sent."""
    return [s for kind in ("seg", "anatomy_seg") for s in pydicom.dcmread(case.paths[kind]).SegmentSequence]


def test_seg_segments_keep_their_laterality_modifiers(case: BuiltCase) -> None:
    annotations = {a.tracking_uid: a for a in make_context(case.source, case.result, uid_root=UID_ROOT, analysis_version=1).annotations}
    sided = {"region": {"L": 0, "R": 0}, "finding": {"L": 0, "R": 0}}
    for segment in segments(case):
        annotation = annotations[str(segment.TrackingUID)]
        site = annotation.sites[0] if annotation.sites else None
        expected = [code_of(site.laterality)] if site is not None and site.laterality is not None else []
        property_type = segment.SegmentedPropertyTypeCodeSequence[0]
        if annotation.is_region:
            assert coded(property_type) == code_of(annotation.finding_type), segment.SegmentLabel
            assert modifiers(property_type, "SegmentedPropertyTypeModifierCodeSequence") == expected, segment.SegmentLabel
            assert "AnatomicRegionSequence" not in segment, segment.SegmentLabel
        else:
            assert modifiers(property_type, "SegmentedPropertyTypeModifierCodeSequence") == [], segment.SegmentLabel
            if site is None:
                assert "AnatomicRegionSequence" not in segment, segment.SegmentLabel
                continue
            [region] = segment.AnatomicRegionSequence
            assert coded(region) == code_of(site.structure), segment.SegmentLabel
            assert modifiers(region, "AnatomicRegionModifierSequence") == expected, segment.SegmentLabel
        if expected:
            side = {code_of(codes.LEFT): "L", code_of(codes.RIGHT): "R"}[expected[0]]
            sided[annotation.kind][side] += 1
    # Not vacuous: every paired region of the codes table is a segment, with its side.
    paired = [s for s in codes.REGION_SITES.values() if s.laterality is not None]
    assert sided["region"]["L"] == sum(s.laterality == codes.LEFT for s in paired) > 0
    assert sided["region"]["R"] == sum(s.laterality == codes.RIGHT for s in paired) > 0
    assert sided["finding"]["L"] + sided["finding"]["R"] > 0, "the factory result has findings on paired structures"


def test_seg_and_sr_agree_on_the_side_of_every_box(case: BuiltCase) -> None:
    """The same tracking UID names the same side in the SEG and in the SR's finding sites."""
    seg_sides = {}
    for segment in segments(case):
        property_type = segment.SegmentedPropertyTypeCodeSequence[0]
        side = modifiers(property_type, "SegmentedPropertyTypeModifierCodeSequence")
        if "AnatomicRegionSequence" in segment:
            side = side or modifiers(segment.AnatomicRegionSequence[0], "AnatomicRegionModifierSequence")
        seg_sides[str(segment.TrackingUID)] = side
    sr = hd.sr.srread(case.paths["sr"])
    sr_sides = {}
    for group in sr.content.get_planar_roi_measurement_groups():
        sites = group_sites(group)
        laterality = sites[0].laterality if sites else None
        sr_sides[str(group.tracking_uid)] = [code_of(laterality)] if laterality is not None else []
    assert sr_sides and sr_sides.keys() <= seg_sides.keys()  # the SR holds the grounded anatomy, the SEGs all of it
    assert {uid: seg_sides[uid] for uid in sr_sides} == sr_sides
    assert sum(1 for side in seg_sides.values() if side) >= 20
