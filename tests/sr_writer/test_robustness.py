"""Bad, odd and foreign input: clipped, dropped with a warning, truncated, encoded, or a clear ValueError."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.settings import DEFAULT_PROFILES
from inference.result import Box, Finding, Report
from sr_writer import codes
from sr_writer.bundle import SEND_ORDER, assemble_bundle, build_bundle, comprehensive_sr_fallback
from sr_writer.context import make_context
from tests.sr_writer.conftest import UID_ROOT
from tests.support.results import make_result, rg1_source
from tests.support.validators import run_dciodvfy, run_dcmpschk

CHARSET_FILES = Path(pydicom.__file__).parent / "data" / "charset_files"


@pytest.fixture(scope="module")
def rg1() -> pydicom.Dataset:
    return rg1_source()


def build(source, result, kinds=SEND_ORDER, **kwargs):
    return assemble_bundle(source, result, kinds, uid_root=kwargs.pop("uid_root", UID_ROOT), analysis_version=kwargs.pop("analysis_version", 1), **kwargs)


def with_findings(result, *findings):
    return dataclasses.replace(result, findings=tuple(findings))


def findings_text(text_sr: pydicom.Dataset) -> str:
    """The text of the TID 2000 Findings section (LN 59776-5)."""
    section = next(i for i in text_sr.ContentSequence if i.ValueType == "CONTAINER" and i.ConceptNameCodeSequence[0].CodeValue == "59776-5")
    return section.ContentSequence[0].TextValue


def model_output_texts(text_sr: pydicom.Dataset) -> list[str]:
    """The TEXT values of the model-output section, or [] when the document has none."""
    for item in text_sr.ContentSequence:
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == codes.MODEL_OUTPUTS_SECTION.value:
            return [i.TextValue for i in item.ContentSequence]
    return []


def sr_comments(sr: pydicom.Dataset) -> list[str]:
    """Every TEXT "Comment" (a region's retrieved sentence) in the SR's measurement groups."""
    groups = container(sr, "126010").ContentSequence
    return [i.TextValue for g in groups for i in g.ContentSequence if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == codes.COMMENT.value]


def container(sr: pydicom.Dataset, code_value: str) -> pydicom.Dataset | None:
    """The document-level CONTAINER with this concept code (126010 Imaging Measurements, C0034375 ...)."""
    found = [i for i in sr.ContentSequence if i.ValueType == "CONTAINER" and i.ConceptNameCodeSequence[0].CodeValue == code_value]
    return found[0] if found else None


def image_label_identifiers(sr: pydicom.Dataset) -> list[str]:
    """The labels of the image-level probabilities in the SR's Qualitative Evaluations container."""
    evaluations = container(sr, codes.QUALITATIVE_EVALUATIONS.value)
    texts = [i.TextValue for i in evaluations.ContentSequence] if evaluations is not None else []
    return [t.split(": image-level probability ")[0] for t in texts if ": image-level probability " in t]


def test_out_of_image_boxes_are_clipped_and_empty_ones_dropped_with_a_warning(rg1: pydicom.Dataset) -> None:
    base = make_result(rg1, n_findings=0)
    cols, rows = int(rg1.Columns), int(rg1.Rows)
    result = with_findings(
        base,
        Finding(0, "Pneumothorax", "apical", (Box(-50.0, -20.0, 300.0, 200.0),), "phrase_grounding", 0.8),
        Finding(1, "Nodule", "off image", (Box(cols + 10.0, 5.0, cols + 90.0, 60.0),), "phrase_grounding", 0.4),
        Finding(2, "Mass", "inverted", (Box(500.0, 500.0, 400.0, 600.0), Box(100.0, 100.0, 180.0, 170.0)), "phrase_grounding", None),
    )
    bundle = build(rg1, result)
    text = "\n".join(bundle.warnings)
    assert "finding 1 ('Nodule')" in text and "finding 2 ('Mass')" in text
    gsps = next(o.dataset for o in bundle.objects if o.kind == "gsps")
    finding_layers = [a for a in gsps.GraphicAnnotationSequence if a.GraphicLayer.startswith("FINDING_")]
    boxes = [np.array(g.GraphicData).reshape(-1, 2) for layer in finding_layers for g in layer.GraphicObjectSequence]
    assert len(boxes) == 2  # pneumothorax (clipped) and the mass's valid second box
    assert np.allclose(boxes[0].min(axis=0), [0, 0]) and np.allclose(boxes[0].max(axis=0), [300, 200])
    for points in boxes:
        assert (points >= 0).all() and (points[:, 0] <= cols).all() and (points[:, 1] <= rows).all()
    sr = next(o.dataset for o in bundle.objects if o.kind == "sr")
    evaluations = [i.TextValue for i in container(sr, codes.QUALITATIVE_EVALUATIONS.value).ContentSequence]
    assert "Nodule 0.40: not localised (whole image); probability 0.40; model text: off image" in evaluations  # still reported, without a box


def test_long_labels_are_cut_to_the_vr_limits_and_still_validate(rg1: pydicom.Dataset, tmp_path: Path) -> None:
    label = " ".join(f"longword{i}" for i in range(40))  # not a repetition loop (that would be unusable text)
    result = with_findings(make_result(rg1, n_findings=0), Finding(0, label, label, (Box(100.0, 100.0, 400.0, 400.0),), "grounded_captioning", 0.5))
    bundle = build(rg1, result, ("sr", "seg", "gsps"))
    gsps = bundle.objects[2].dataset
    seg = bundle.objects[1].dataset
    tracking_ids = [g.TrackingID for a in gsps.GraphicAnnotationSequence for g in a.get("GraphicObjectSequence", [])]
    assert all(len(t) <= 64 for t in tracking_ids) and any(t.endswith("...") for t in tracking_ids)
    assert all(len(s.SegmentLabel) <= 64 for s in seg.SegmentSequence)
    for built in bundle.objects:
        path = tmp_path / f"{built.kind}.dcm"
        built.dataset.save_as(path, enforce_file_format=True)
        assert not run_dciodvfy(path).problems, run_dciodvfy(path).describe()


def japanese_source() -> pydicom.Dataset:
    """pydicom's chrJapMulti.dcm (CR, ISO 2022 IR 87, multi-byte patient name), given real-looking pixels."""
    ds = pydicom.dcmread(CHARSET_FILES / "chrJapMulti.dcm")
    rows, columns = int(ds.Rows), int(ds.Columns)
    ramp = (np.add.outer(np.arange(rows), np.arange(columns)) * 60).astype(np.uint16)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 16, 12, 11, 0, 1
    ds.PixelData = ramp.tobytes()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    # Its birth date 18000101 makes dcmpschk fail ("dubious date") on any object that copies it, as it
    # must; that is the sample's oddity, not a character set matter, so use a plausible date.
    ds.PatientBirthDate = "19500101"
    return ds


def test_japanese_text_keeps_the_source_character_set(tmp_path: Path) -> None:
    source = japanese_source()
    result = make_result(source, n_findings=2, demo=False)
    result = dataclasses.replace(
        result,
        findings=(Finding(0, "胸水", "右胸水を認める。", (Box(2.0, 20.0, 12.0, 30.0),), "grounded_diagnosis", 0.7, (35,)),),
        report=Report(findings="右胸水を認める。", impression="胸水。", raw_text="右胸水を認める。胸水。"),
    )
    bundle = build(source, result)
    for built in bundle.objects:
        # The source's "\\ISO 2022 IR 87" (empty first value = default repertoire) in its defined-term form.
        assert list(built.dataset.SpecificCharacterSet) == ["ISO 2022 IR 6", "ISO 2022 IR 87"], built.kind
        path = tmp_path / f"{built.kind}.dcm"
        built.dataset.save_as(path, enforce_file_format=True)
        again = pydicom.dcmread(path)
        assert str(again.PatientName) == str(source.PatientName)
        assert not run_dciodvfy(path).problems, run_dciodvfy(path).describe()
    gsps = pydicom.dcmread(tmp_path / "gsps.dcm")
    texts = [t.UnformattedTextValue for a in gsps.GraphicAnnotationSequence for t in a.get("TextObjectSequence", [])]
    assert "胸水 0.70" in texts
    assert not run_dcmpschk(tmp_path / "gsps.dcm").problems
    text_sr = pydicom.dcmread(tmp_path / "text_sr.dcm")
    assert "右胸水を認める。" in findings_text(text_sr)


def test_text_the_source_set_cannot_hold_switches_to_utf8(rg1: pydicom.Dataset, tmp_path: Path) -> None:
    assert rg1.SpecificCharacterSet == "ISO_IR 100"
    greek = "Πλευριτική συλλογή δεξιά."
    result = dataclasses.replace(make_result(rg1, n_findings=1), report=Report(findings=greek, impression=greek, raw_text=greek))
    text_sr = build(rg1, result, ("text_sr",)).objects[0].dataset
    assert text_sr.SpecificCharacterSet == "ISO_IR 192"
    path = tmp_path / "text_sr.dcm"
    text_sr.save_as(path, enforce_file_format=True)
    again = pydicom.dcmread(path)
    assert greek in findings_text(again)
    assert str(again.PatientName) == str(rg1.PatientName)
    # Latin-1 text stays in the source's ISO_IR 100.
    latin = dataclasses.replace(result, report=Report(findings="Épanchement pleural.", impression="Épanchement.", raw_text=""))
    assert build(rg1, latin, ("text_sr",)).objects[0].dataset.SpecificCharacterSet == "ISO_IR 100"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: dataclasses.replace(r, sop_instance_uid="1.2.3.4"), "sop_instance_uid"),
        (lambda r: dataclasses.replace(r, rows=100), "image size"),
        (lambda r: with_findings(r, Finding(0, "Mass", "", (Box(math.nan, 1.0, 5.0, 5.0),), "vqa")), r"findings\[0\].boxes\[0\]"),
        (lambda r: with_findings(r, Finding(0, "Mass", "", (), "vqa", probability=1.5)), r"findings\[0\].probability"),
        (lambda r: with_findings(r, Finding(0, "Mass", "", (), "vqa", region_indices=(40,))), "region index 40"),
        (lambda r: dataclasses.replace(r, model=dataclasses.replace(r.model, device_uid="weights-v1")), "device_uid"),
    ],
)
def test_unrepresentable_results_raise_value_error_naming_the_argument(rg1: pydicom.Dataset, change, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(rg1, change(make_result(rg1, n_findings=2)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kinds": ("sr", "pdf")}, "unknown object kind"),
        ({"kinds": "sr"}, "not the string"),
        ({"kinds": ()}, "kinds is empty"),
        ({"uid_root": "1.2.3"}, "uid_root"),
        ({"analysis_version": 0}, "analysis_version"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(rg1: pydicom.Dataset, kwargs: dict, message: str) -> None:
    kinds = kwargs.pop("kinds", SEND_ORDER)
    with pytest.raises(ValueError, match=message):
        build(rg1, make_result(rg1, n_findings=1), kinds, **kwargs)


def test_a_multiframe_or_non_image_source_is_refused(rg1: pydicom.Dataset) -> None:
    result = make_result(rg1, n_findings=1)
    multi = rg1_source()
    multi.NumberOfFrames = 2
    with pytest.raises(ValueError, match="frames"):
        build(multi, result)
    bare = pydicom.Dataset()
    with pytest.raises(ValueError, match="lacks"):
        build(bare, result)


def test_no_report_skips_text_sr_and_logs_without_patient_data(rg1: pydicom.Dataset, caplog: pytest.LogCaptureFixture) -> None:
    result = dataclasses.replace(make_result(rg1, n_findings=1), report=None)
    with caplog.at_level(logging.WARNING, logger="sr_writer"):
        objects = build_bundle(rg1, result, ("sr", "text_sr"), uid_root=UID_ROOT, analysis_version=1)
    assert [o.kind for o in objects] == ["sr"]
    assert "text_sr skipped" in caplog.text
    for identifier in (str(rg1.PatientName), str(rg1.PatientID), str(rg1.PatientBirthDate)):
        assert identifier not in caplog.text


@pytest.mark.parametrize("profile", sorted(DEFAULT_PROFILES))
def test_every_default_profile_builds_its_kinds_in_send_order(rg1: pydicom.Dataset, profile: str) -> None:
    kinds = DEFAULT_PROFILES[profile]
    objects = build_bundle(rg1, make_result(rg1, n_findings=2), kinds, uid_root=UID_ROOT, analysis_version=1)
    assert [o.kind for o in objects] == [k for k in SEND_ORDER if k in kinds]
    assert all(o.sop_instance_uid == str(o.dataset.SOPInstanceUID) for o in objects)


def test_fallback_is_the_same_document_as_comprehensive_sr(rg1: pydicom.Dataset) -> None:
    sr = build(rg1, make_result(rg1, n_findings=2), ("sr",)).objects[0].dataset
    fallback = comprehensive_sr_fallback(sr)
    assert fallback.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33" == fallback.file_meta.MediaStorageSOPClassUID
    assert fallback.SOPInstanceUID == sr.SOPInstanceUID and fallback.ContentSequence == sr.ContentSequence
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # the original is untouched
    with pytest.raises(ValueError, match="SOP Class"):
        comprehensive_sr_fallback(rg1)


def test_procedure_reported_comes_from_the_study_when_it_has_one() -> None:
    source = rg1_source()
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "RPID16", "RADLEX", "XR CHEST PA"
    source.ProcedureCodeSequence = [item]
    sr = build(source, make_result(source, n_findings=1), ("sr",)).objects[0].dataset
    procedure = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert [(p.ConceptCodeSequence[0].CodeValue, p.ConceptCodeSequence[0].CodingSchemeDesignator) for p in procedure] == [("RPID16", "RADLEX")]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -0.01, 1.5, None, "0.5"])
def test_a_bad_image_label_probability_raises_value_error_naming_the_label(rg1: pydicom.Dataset, bad: object) -> None:
    result = make_result(rg1, n_findings=1)
    result = dataclasses.replace(result, image_labels={**result.image_labels, "Pleural Effusion": bad})
    with pytest.raises(ValueError, match=r"image_labels\['Pleural Effusion'\].*probability must be a number in \[0, 1\]"):
        build(rg1, result, ("text_sr",))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({"  ": 0.5}, "non-empty string"),
        ({"Lung Opacity": 0.5, "lung  opacity": 0.4}, "same label as 'Lung Opacity'"),
        ([("Edema", 0.5)], "must be a dict"),
    ],
)
def test_unusable_image_labels_raise_value_error(rg1: pydicom.Dataset, labels: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(rg1, dataclasses.replace(make_result(rg1, n_findings=1), image_labels=labels), ("sr",))


def test_a_sentence_that_is_not_text_raises_value_error_naming_the_region(rg1: pydicom.Dataset) -> None:
    result = make_result(rg1, n_findings=1)
    regions = list(result.regions)
    regions[4] = dataclasses.replace(regions[4], retrieved_sentence=["The heart is normal."])
    with pytest.raises(ValueError, match=r"regions\[4\].retrieved_sentence must be a string or None"):
        build(rg1, dataclasses.replace(result, regions=tuple(regions)), ("sr",))


def test_missing_sentences_and_labels_add_nothing_and_blank_ones_count_as_missing(rg1: pydicom.Dataset) -> None:
    result = make_result(rg1, n_findings=2, image_labels={})
    regions = [dataclasses.replace(r, retrieved_sentence=None) for r in result.regions]
    regions[4] = dataclasses.replace(regions[4], retrieved_sentence="  The cardiac   silhouette is normal.\n")
    regions[11] = dataclasses.replace(regions[11], retrieved_sentence="   ")
    regions[20] = dataclasses.replace(regions[20], box=None, retrieved_sentence="The right lung is clear.")  # not located
    sr, text_sr = (o.dataset for o in build(rg1, dataclasses.replace(result, regions=tuple(regions)), ("sr", "text_sr"), sr_anatomy="grounded").objects)
    assert sr_comments(sr) == ["The cardiac silhouette is normal."]  # the unlocated region has no group to carry it
    assert image_label_identifiers(sr) == []
    assert model_output_texts(text_sr)[1:] == ["Heart: The cardiac silhouette is normal.", "Right lung: The right lung is clear."]
    assert "image-level probabilities" not in model_output_texts(text_sr)[0]
    nothing = dataclasses.replace(result, regions=tuple(dataclasses.replace(r, retrieved_sentence=None) for r in result.regions))
    sr, text_sr = (o.dataset for o in build(rg1, nothing, ("sr", "text_sr")).objects)
    assert sr_comments(sr) == [] and model_output_texts(text_sr) == []
    assert [i.ConceptNameCodeSequence[0].CodeValue for i in text_sr.ContentSequence if i.ValueType == "CONTAINER"] == ["59776-5", "19005-8"]


def test_labels_alone_give_the_section_without_region_lines_and_no_demo_mark_for_real_weights(rg1: pydicom.Dataset) -> None:
    result = make_result(rg1, n_findings=1, demo=False, image_labels={"Edema": 0.25, "Cardiomegaly": 0.25, "Pneumothorax": 0.9})
    result = dataclasses.replace(result, regions=tuple(dataclasses.replace(r, retrieved_sentence=None) for r in result.regions))
    texts = model_output_texts(build(rg1, result, ("text_sr",)).objects[0].dataset)
    assert not texts[0].startswith("DEMO") and "anatomical region" not in texts[0]
    assert texts[1:] == ["Pneumothorax: probability 0.90", "Cardiomegaly: probability 0.25", "Edema: probability 0.25"]  # ties by label


def test_image_label_tracking_uids_are_deterministic_and_change_with_version_and_device(rg1: pydicom.Dataset) -> None:
    result = make_result(rg1, n_findings=1)

    def uids(res, version=1):
        return [label.tracking_uid for label in make_context(rg1, res, uid_root=UID_ROOT, analysis_version=version).image_labels]

    first = uids(result)
    assert first == uids(result) and len(set(first)) == 14
    other_device = dataclasses.replace(result, model=dataclasses.replace(result.model, device_uid="1.2.826.0.1.3680043.10.1431.1.2"))
    assert not set(first) & set(uids(result, 2)) and not set(first) & set(uids(other_device))
    # The UID follows the label, not its position: dropping one label leaves the others' UIDs alone.
    fewer = dataclasses.replace(result, image_labels={k: v for k, v in result.image_labels.items() if k != "Atelectasis"})
    assert set(uids(fewer)) < set(first)


def test_non_latin_sentences_and_labels_switch_the_objects_to_utf8(rg1: pydicom.Dataset, tmp_path: Path) -> None:
    greek = "Η καρδιακή σκιά είναι φυσιολογική."
    result = make_result(rg1, n_findings=1, image_labels={"Καρδιομεγαλία": 0.4})
    regions = list(result.regions)
    regions[4] = dataclasses.replace(regions[4], retrieved_sentence=greek)
    bundle = build(rg1, dataclasses.replace(result, regions=tuple(regions)), ("sr", "text_sr"), sr_anatomy="grounded")
    for built in bundle.objects:
        assert built.dataset.SpecificCharacterSet == "ISO_IR 192", built.kind
        path = tmp_path / f"{built.kind}.dcm"
        built.dataset.save_as(path, enforce_file_format=True)
        assert not run_dciodvfy(path).problems, run_dciodvfy(path).describe()
    assert greek in sr_comments(pydicom.dcmread(tmp_path / "sr.dcm"))
    assert image_label_identifiers(pydicom.dcmread(tmp_path / "sr.dcm")) == ["Καρδιομεγαλία"]
    assert f"Heart: {greek}" in model_output_texts(pydicom.dcmread(tmp_path / "text_sr.dcm"))
