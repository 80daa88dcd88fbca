"""Objects read back through highdicom's readers carry the result's boxes, codes and tracking UIDs."""

from __future__ import annotations

from dataclasses import replace

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.sr.utils import find_content_items

from sr_writer import codes
from sr_writer.bundle import assemble_bundle
from sr_writer.context import display_region_name, make_context
from sr_writer.sc import SC_MAX_SIDE
from sr_writer.seg import box_pixel_slice
from tests.sr_writer.conftest import UID_ROOT, BuiltCase, group_sites, read_seg


def expected_context(case: BuiltCase):
    return make_context(case.source, case.result, uid_root=UID_ROOT, analysis_version=1)


def expected_annotations(case: BuiltCase):
    return expected_context(case).annotations


def expected_image_labels(case: BuiltCase):
    return make_context(case.source, case.result, uid_root=UID_ROOT, analysis_version=1).image_labels


def is_image_label_group(group) -> bool:
    return str(group.tracking_identifier).startswith("image-label ")


def comment_texts(group) -> list[str]:
    return [item.value for item in find_content_items(group[0], name=codes.COMMENT, value_type="TEXT")]


def finding_sites(annotations) -> set:
    """Every (structure, laterality) site a finding names, located or not."""
    return {site for a in annotations if not a.is_region for site in a.sites}


def test_default_sr_holds_only_the_finding_boxes(case: BuiltCase) -> None:
    """OHIF draws every measurement group: the default SR ("findings") holds the located findings only."""
    sr = hd.sr.srread(case.paths["sr"])
    uids = {str(g.tracking_uid) for g in sr.content.get_planar_roi_measurement_groups()}
    assert uids == {a.tracking_uid for a in expected_annotations(case) if not a.is_region and a.box is not None}
    [comment] = [text for value, _, text in qualitative_evaluation_texts(sr) if value == codes.COMMENT.value]
    assert "36 located anatomical regions are not measurement groups here (none is shown)" in comment


def test_grounded_sr_holds_every_finding_box_and_only_the_regions_a_finding_is_grounded_to(case: BuiltCase, tmp_path) -> None:
    """``sr_anatomy = "grounded"``: each located finding and each located region whose site a finding
    names; its Qualitative Evaluations comment counts the regions left out and says where they are."""
    sr = sr_with_anatomy(case, tmp_path, "grounded")
    uids = {str(g.tracking_uid) for g in sr.content.get_planar_roi_measurement_groups()}
    annotations = expected_annotations(case)
    findings = [a for a in annotations if not a.is_region and a.box is not None]
    regions = [a for a in annotations if a.is_region and a.box is not None]
    assert len(findings) == sum(len(f.boxes) for f in case.result.findings) and len(regions) == 36
    assert {a.tracking_uid for a in findings} <= uids
    sites = finding_sites(annotations)
    grounded = [a for a in regions if a.sites[0] in sites]
    assert 0 < len(grounded) < 36, "the factory result grounds findings to some regions, not all"
    assert uids == {a.tracking_uid for a in findings + grounded}
    [comment] = [text for value, _, text in qualitative_evaluation_texts(sr) if value == codes.COMMENT.value]
    assert f"{36 - len(grounded)} located anatomical regions are not measurement groups here (the {len(grounded)} a finding" in comment
    assert "anatomy segmentation (SEG)" in comment
    seg_uids = {str(s.TrackingUID) for s in pydicom.dcmread(case.paths["seg"]).SegmentSequence}
    assert seg_uids == {a.tracking_uid for a in findings}, "the SEG holds the findings only (what is seen at once)"
    anatomy = assemble_bundle(case.source, case.result, ["anatomy_seg"], uid_root=UID_ROOT, analysis_version=1).objects[0].dataset
    assert {str(s.TrackingUID) for s in anatomy.SegmentSequence} == {a.tracking_uid for a in regions}, "the anatomy SEG keeps it"


def sr_with_all_anatomy(case: BuiltCase, directory) -> hd.sr.Comprehensive3DSR:
    """The case's SR built with ``sr_anatomy = "all"``, read back."""
    return sr_with_anatomy(case, directory, "all")


def sr_with_anatomy(case: BuiltCase, directory, mode: str) -> hd.sr.Comprehensive3DSR:
    """The case's SR built with ``sr_anatomy = mode``, read back."""
    bundle = assemble_bundle(case.source, case.result, ["sr"], uid_root=UID_ROOT, analysis_version=1, sr_anatomy=mode)
    path = directory / f"sr-{mode}.dcm"
    bundle.objects[0].dataset.save_as(path, enforce_file_format=True)
    return hd.sr.srread(path)


def test_sr_anatomy_all_keeps_every_region(case: BuiltCase, tmp_path) -> None:
    sr = sr_with_all_anatomy(case, tmp_path)
    boxed = [a for a in expected_annotations(case) if a.box is not None]
    assert len(sr.content.get_planar_roi_measurement_groups()) == len(boxed) == 36 + sum(len(f.boxes) for f in case.result.findings)
    assert not any("not measurement groups" in text for _, _, text in qualitative_evaluation_texts(sr))


def test_sr_of_a_result_without_findings_says_where_the_anatomy_is(case: BuiltCase, tmp_path) -> None:
    """No finding: one whole-image group says so (OHIF 3.13 crashes on a report without any group), and
    the comment says where the anatomy is."""
    result = replace(case.result, findings=(), image_labels={})
    [built] = assemble_bundle(case.source, result, ["sr"], uid_root=UID_ROOT, analysis_version=1).objects
    [measurements] = [i for i in built.dataset.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    [group] = measurements.ContentSequence
    names = {i.ConceptNameCodeSequence[0].CodeValue: i for i in group.ContentSequence}
    assert names["121071"].ConceptCodeSequence[0].CodeValue == codes.NO_ABNORMALITY.value
    assert names["112039"].TextValue == "No finding detected by AI"
    assert built.dataset.SeriesDescription.startswith("Findings SR: none - AI, DEMO WEIGHTS")
    [(value, _, text)] = qualitative_evaluation_texts(built.dataset)
    assert value == codes.COMMENT.value
    assert "36 located anatomical regions are not measurement groups here (none is shown)" in text
    with pytest.raises(ValueError, match="sr_anatomy 'none' must be one of findings, grounded, all"):
        assemble_bundle(case.source, result, ["sr"], uid_root=UID_ROOT, analysis_version=1, sr_anatomy="none")


def test_sr_roundtrip_boxes_codes_and_tracking_uids(case: BuiltCase) -> None:
    sr = hd.sr.srread(case.paths["sr"])
    groups = sr.content.get_planar_roi_measurement_groups()
    boxed = list(expected_context(case).sr_boxed)
    assert len(groups) == len(boxed)
    by_uid = {str(g.tracking_uid): g for g in groups}
    for annotation in boxed:
        group = by_uid[annotation.tracking_uid]
        points = group.roi.value
        box = annotation.box
        assert points.shape == (5, 2) and np.array_equal(points[0], points[-1])
        assert np.allclose(points.min(axis=0), [box.x1, box.y1], atol=0.01)
        assert np.allclose(points.max(axis=0), [box.x2, box.y2], atol=0.01)
        assert group.finding_type.value == annotation.finding_type.value
        assert group.finding_type.scheme_designator == annotation.finding_type.scheme_designator
        sites = group_sites(group)
        assert [s.value.value for s in sites] == [site.structure.value for site in annotation.sites]
        for site, expected in zip(sites, annotation.sites):
            laterality = site.laterality
            assert (laterality.value if laterality is not None else None) == (expected.laterality.value if expected.laterality else None)
        assert str(group.tracking_identifier) == annotation.tracking_id
    # A finding without a box is no measurement group (OHIF cannot draw one): see the next test.
    assert not sr.content.get_image_measurement_groups()


def qualitative_evaluation_texts(sr) -> list[tuple[str, str, str]]:
    """(code value, scheme, text) of each TEXT item in the SR's Qualitative Evaluations container."""
    [container] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == codes.QUALITATIVE_EVALUATIONS.value]
    return [(i.ConceptNameCodeSequence[0].CodeValue, i.ConceptNameCodeSequence[0].CodingSchemeDesignator, i.TextValue) for i in container.ContentSequence]


def test_sr_keeps_image_labels_and_unlocalised_findings_outside_the_measurement_groups(case: BuiltCase) -> None:
    """OHIF 3.13 crashes on a measurement group without SCOORD: every group has one, and the whole-image
    statements (14 image-level probabilities, findings without a box) are TEXT items of TID 1500's
    Qualitative Evaluations container, each named by its finding type, each fact kept."""
    sr = hd.sr.srread(case.paths["sr"])
    [imaging] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    for group in imaging.ContentSequence:
        assert any(i.ValueType == "SCOORD" for i in group.ContentSequence), "a measurement group without SCOORD crashes OHIF"
    items = qualitative_evaluation_texts(sr)
    assert items[0][0] == codes.COMMENT.value and "image-level probabilities" in items[0][2]
    labels = expected_image_labels(case)
    assert len(labels) == len(case.result.image_labels) == 14
    label_items = items[1 : 1 + len(labels)]
    for expected, (value, scheme, text) in zip(labels, label_items):
        code = codes.finding_type_for_label(expected.label)
        assert (value, scheme) == (code.value, code.scheme_designator)
        assert text == f"{expected.label}: image-level probability {case.result.image_labels[expected.label]:.2f}"
    unboxed = [a for a in expected_annotations(case) if a.box is None]
    assert unboxed, "the factory result has findings without boxes"
    unboxed_items = items[1 + len(labels) :]
    assert len(unboxed_items) == len(unboxed)
    for annotation, (value, scheme, text) in zip(unboxed, unboxed_items):
        assert (value, scheme) == (annotation.finding_type.value, annotation.finding_type.scheme_designator)
        assert text.startswith(f"{annotation.label}: not localised (whole image)")
        if annotation.probability is not None:
            assert f"probability {annotation.probability:.2f}" in text
        assert annotation.text in text


def test_sr_finding_site_meaning_names_the_side_and_keeps_the_laterality_modifier(case: BuiltCase, tmp_path) -> None:
    """OHIF labels a box with its first Finding Site's Code Meaning and ignores nested modifiers."""
    sr = sr_with_all_anatomy(case, tmp_path)  # every region, so the three named below are all there
    meanings = {}
    for group in sr.content.get_planar_roi_measurement_groups():
        site = group_sites(group)[0]
        meanings[site.value.meaning] = site.laterality.value if site.laterality is not None else None
    assert meanings["Right costophrenic angle"] == codes.RIGHT.value
    assert meanings["Left lung"] == codes.LEFT.value
    assert meanings["Heart"] is None


def test_sr_roundtrip_finds_each_region_sentence_in_its_region_group(case: BuiltCase, tmp_path) -> None:
    sr = sr_with_anatomy(case, tmp_path, "grounded")
    sentences = {case.result.regions[i].index: case.result.regions[i].retrieved_sentence for i in range(len(case.result.regions))}
    assert all(sentences.values()) and len(sentences) == 36
    regions = {a.tracking_uid: a for a in expected_context(case).grounded_regions}
    sentences = {index: s for index, s in sentences.items() if any(a.key == f"region-{index:02d}" for a in regions.values())}
    assert sentences, "some region is grounded"
    found = {}
    for group in sr.content.get_planar_roi_measurement_groups():
        annotation = regions.get(str(group.tracking_uid))
        if annotation is None:
            assert comment_texts(group) == []  # findings carry their text elsewhere (labels, report)
            continue
        found[int(annotation.key.removeprefix("region-"))] = comment_texts(group)
    assert found == {index: [sentence] for index, sentence in sentences.items()}


def test_sr_header_follows_ihe_air(case: BuiltCase) -> None:
    sr = case.dataset("sr")
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert (sr.PreliminaryFlag, sr.VerificationFlag, sr.CompletionFlag) == ("PRELIMINARY", "UNVERIFIED", "COMPLETE")
    assert sr.StudyInstanceUID == case.source.StudyInstanceUID and sr.SeriesInstanceUID != case.source.SeriesInstanceUID
    equipment = sr.ContributingEquipmentSequence[0]
    purpose = equipment.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == ("Newcode1", "99IHE", "Processing Algorithm")
    assert equipment.DeviceUID == case.result.model.device_uid
    assert equipment.ManufacturerModelName == case.result.model.name and equipment.SoftwareVersions == case.result.model.version
    procedure = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058"][0]
    assert procedure.ConceptCodeSequence[0].CodeValue == "43468-8"  # RG1 has no Procedure Code Sequence: CID 100's XR
    designators = {i.CodingSchemeDesignator for i in sr.CodingSchemeIdentificationSequence}
    assert {"99ANATOMIX", "99IHE"} <= designators


def test_seg_roundtrip_masks_and_tracking_uids(case: BuiltCase) -> None:
    seg = read_seg(case.paths["seg"])
    boxed = [a for a in expected_annotations(case) if a.box is not None and not a.is_region]
    numbers = list(seg.segment_numbers)
    assert len(numbers) == len(boxed)
    assert seg.SegmentationType == "FRACTIONAL" and seg.SegmentationFractionalType == "OCCUPANCY"  # 0/255: see sr_writer/seg.py
    pixels = seg.get_pixels_by_source_instance([str(case.source.SOPInstanceUID)], segment_numbers=numbers)
    assert pixels.shape == (1, case.source.Rows, case.source.Columns, len(numbers))
    for number, annotation in zip(numbers, boxed):
        description = seg.get_segment_description(number)
        assert description.tracking_uid == annotation.tracking_uid
        assert description.tracking_id == annotation.tracking_id
        assert description.segmented_property_type.value == annotation.finding_type.value
        rows_, columns_ = np.nonzero(pixels[0, :, :, number - 1])
        row_slice, column_slice = box_pixel_slice(annotation.box, case.source.Rows, case.source.Columns)
        assert (rows_.min(), rows_.max() + 1, columns_.min(), columns_.max() + 1) == (row_slice.start, row_slice.stop, column_slice.start, column_slice.stop)
        assert len(rows_) == (row_slice.stop - row_slice.start) * (column_slice.stop - column_slice.start)  # box-filled
    for number, annotation in zip(numbers, boxed):
        category = seg.get_segment_description(number).segmented_property_category.value
        assert category == (codes.ANATOMICAL_STRUCTURE.value if annotation.is_region else codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE.value)


def test_seg_carries_the_geometry_ohif_needs_and_no_invented_spacing(case: BuiltCase) -> None:
    seg = case.dataset("seg")
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert list(shared.PlaneOrientationSequence[0].ImageOrientationPatient) == [1, 0, 0, 0, 1, 0]
    if case.name == "dx":
        assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [0.143, 0.143]  # from ImagerPixelSpacing
    else:
        # RG1's PixelSpacing is 0\\0: a Pixel Measures item (OHIF needs it) with no spacing invented.
        assert "PixelSpacing" not in shared.PixelMeasuresSequence[0] and "PixelSpacing" not in seg
    read_seg(case.paths["seg"])
    assert seg.PatientOrientation in (None, "")  # Type 2C, empty: the source image states it (pixelmed VM)
    assert "Laterality" not in seg and shared.FrameAnatomySequence[0].FrameLaterality == "U"


def test_gsps_has_same_tracking_uids_layers_and_display_pipeline(case: BuiltCase) -> None:
    gsps = pydicom.dcmread(case.paths["gsps"])
    layers = [item.GraphicLayer for item in sorted(gsps.GraphicLayerSequence, key=lambda i: -i.GraphicLayerOrder)]
    # Top first: whole-image lines, one layer per finding, one per grounded region, then all other anatomy.
    assert layers[0] == "WHOLE_IMAGE" and layers[-1] == "ANATOMY"
    kinds = [name.split("_")[0] for name in layers[1:-1]]
    assert kinds == sorted(kinds) and set(kinds) == {"FINDING", "REGION"}  # findings above anatomy
    colours = [tuple(item.GraphicLayerRecommendedDisplayCIELabValue) for item in gsps.GraphicLayerSequence]
    assert len(set(colours)) == len(colours)
    uids = [g.TrackingUID for annotation in gsps.GraphicAnnotationSequence for g in annotation.get("GraphicObjectSequence", [])]
    boxed = [a for a in expected_annotations(case) if a.box is not None]
    assert sorted(uids) == sorted(a.tracking_uid for a in boxed)
    texts = [t for annotation in gsps.GraphicAnnotationSequence for t in annotation.get("TextObjectSequence", [])]
    unboxed = [a for a in expected_annotations(case) if a.box is None]
    whole_image = {t.TrackingUID: t.UnformattedTextValue for t in texts if "TrackingUID" in t}
    assert whole_image == {a.tracking_uid: f"{a.label} (whole image)" for a in unboxed} and unboxed
    for text in texts:
        left, top = text.BoundingBoxTopLeftHandCorner
        right, bottom = text.BoundingBoxBottomRightHandCorner
        assert 0 <= left < right <= case.source.Columns and 0 <= top < bottom <= case.source.Rows
    expected_shape = "INVERSE" if case.source.PhotometricInterpretation == "MONOCHROME1" else "IDENTITY"
    assert gsps.PresentationLUTShape == expected_shape
    voi = gsps.SoftcopyVOILUTSequence[0]
    assert float(voi.WindowCenter) == float(case.source.WindowCenter)
    assert float(voi.WindowWidth) == float(case.source.WindowWidth)
    assert gsps.BodyPartExamined == "CHEST"
    assert len(gsps.ContentLabel) <= 16 and all(len(i.GraphicLayer) <= 16 for i in gsps.GraphicLayerSequence)


@pytest.mark.parametrize("kind", ["sr", "text_sr", "seg", "gsps", "sc", "kos"])
def test_demo_results_say_so(case: BuiltCase, kind: str) -> None:
    dataset = case.dataset(kind)
    assert case.result.model.demo
    assert "DEMO WEIGHTS - NOT FOR CLINICAL USE" in dataset.SeriesDescription
    if kind in ("seg", "gsps"):
        assert "DEMO" in dataset.ContentLabel and "DEMO WEIGHTS - NOT FOR CLINICAL USE" in dataset.ContentDescription
    if kind == "text_sr":  # every section opens with the warning, the model-output section included
        for section in (i for i in dataset.ContentSequence if i.ValueType == "CONTAINER"):
            assert section.ContentSequence[0].TextValue.startswith("DEMO WEIGHTS - NOT FOR CLINICAL USE"), section.ConceptNameCodeSequence[0].CodeMeaning


def test_text_sr_is_basic_text_tid2000_with_the_report(case: BuiltCase) -> None:
    text_sr = pydicom.dcmread(case.paths["text_sr"])
    assert text_sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.11" == text_sr.file_meta.MediaStorageSOPClassUID
    assert text_sr.ContentTemplateSequence[0].TemplateIdentifier == "2000"
    sections = {i.ConceptNameCodeSequence[0].CodeValue: i for i in text_sr.ContentSequence if i.ValueType == "CONTAINER"}
    assert list(sections) == ["59776-5", "19005-8", codes.MODEL_OUTPUTS_SECTION.value]
    assert case.result.report.findings in sections["59776-5"].ContentSequence[0].TextValue
    assert case.result.report.impression in sections["19005-8"].ContentSequence[0].TextValue

    def value_types(items):
        for item in items:
            yield item.ValueType
            yield from value_types(item.get("ContentSequence", []))

    assert not {"NUM", "SCOORD", "SCOORD3D"} & set(value_types(text_sr.ContentSequence))
    assert set(value_types(text_sr.ContentSequence)) <= {"CONTAINER", "TEXT", "CODE", "UIDREF"}


def test_text_sr_lists_label_probabilities_descending_then_region_sentences(case: BuiltCase) -> None:
    text_sr = pydicom.dcmread(case.paths["text_sr"])
    outputs = text_sr.ContentSequence[-1]
    heading = outputs.ConceptNameCodeSequence[0]
    assert (heading.CodeValue, heading.CodingSchemeDesignator) == (codes.MODEL_OUTPUTS_SECTION.value, "99ANATOMIX")
    items = [(i.ValueType, i.ConceptNameCodeSequence[0].CodeValue, i.TextValue) for i in outputs.ContentSequence]
    assert {value_type for value_type, _, _ in items} == {"TEXT"}
    note, *lines = items
    assert note[1] == codes.COMMENT.value and "probability, not a statement that the finding is present" in note[2]
    assert {code for _, code, _ in lines} == {codes.FINDING.value}
    labels = sorted(case.result.image_labels.items(), key=lambda item: -item[1])
    expected = [f"{label}: probability {p:.2f}" for label, p in labels]
    expected += [f"{display_region_name(r.index)}: {r.retrieved_sentence}" for r in case.result.regions]
    assert [text for _, _, text in lines] == expected
    assert lines[0][2] == "Cardiomegaly: probability 0.91" and lines[13][2] == "No Finding: probability 0.03"


def test_sc_is_marked_as_derived_burned_in_and_not_for_diagnosis(case: BuiltCase) -> None:
    sc = pydicom.dcmread(case.paths["sc"])
    assert sc.BurnedInAnnotation == "YES" and list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == case.source.SOPInstanceUID
    assert "NOT FOR DIAGNOSIS" in sc.DerivationDescription
    # Banner above and legend below are added rows: taller than the source for its width (same width
    # unless the rendering was downscaled to SC_MAX_SIDE).
    assert sc.SamplesPerPixel == 3 and max(sc.Rows, sc.Columns) <= max(SC_MAX_SIDE, case.source.Rows, case.source.Columns)
    assert sc.Rows / sc.Columns > case.source.Rows / case.source.Columns


def test_kos_references_the_image_and_every_result(case: BuiltCase) -> None:
    kos = pydicom.dcmread(case.paths["kos"])
    referenced = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in kos.ContentSequence if "ReferencedSOPSequence" in item}
    expected = {str(case.source.SOPInstanceUID)} | {o.sop_instance_uid for o in case.bundle.objects if o.kind != "kos"}
    assert referenced == expected
