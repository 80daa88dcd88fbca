"""Model text reaching DICOM is valid for its VR; degenerate text is flagged; header texts are right."""

from __future__ import annotations

import dataclasses

import pydicom
import pytest
from pydicom.data import get_testdata_file

from inference.result import Report, unusable_text_reason
from sr_writer.bundle import SEND_ORDER, assemble_bundle
from sr_writer.text import NOT_USABLE, clean_model_text, truncate
from tests.sr_writer.conftest import UID_ROOT
from tests.support.results import make_result, rg1_source


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        (" \n\t ", "empty"),
        ("<emb><obj_3></s>", "empty"),
        ("\ufffd\ufffd\ufffd lungs", "replacement characters"),
        ("No acute disease. " * 5, "repetition loop"),
        ("Findings: " + "the " * 6, "repetition loop"),
        ("abcabcabcabcabcabcabcabcabc", "repetition loop"),
        ("The heart is normal. No effusion. Lungs are clear.", None),
        ("Size 5 x 5 x 5 mm. Stable. Stable.", None),
    ],
)
def test_degenerate_model_text_is_recognised(text: str, reason: str | None) -> None:
    assert unusable_text_reason(text) == reason


def test_cleaning_removes_controls_tokens_and_replacement_characters_but_keeps_line_breaks() -> None:
    dirty = "Heart\x15 normal.<emb>\r\nOpacity in <obj_12>.\x00\ufffd\tEnd\x0c"
    assert clean_model_text(dirty) == "Heart normal. \r\nOpacity in Left mid lung zone. End"  # runs of blanks collapse
    assert clean_model_text(dirty, multiline=False) == "Heart normal. Opacity in Left mid lung zone. End"
    assert truncate("a\x15b <pad> c", "LO") == "a b c"


def test_truncation_never_cuts_a_word() -> None:
    text = "DEMO WEIGHTS - NOT FOR CLINICAL USE: regions and findings overlay for the chest"
    cut = truncate(text, "LO")
    assert len(cut) <= 64 and cut.endswith("...")
    assert text.startswith(cut[:-3]) and text[len(cut) - 3] == " "


def test_with_text_checks_flags_degenerate_report_and_finding_text() -> None:
    source = rg1_source()
    result = make_result(source, n_findings=2)
    bad = dataclasses.replace(result, report=Report("No acute disease. " * 10, "\ufffd\ufffd\ufffd", "raw"))
    checked = bad.with_text_checks()
    assert "report findings: model output not usable (repetition loop)" in checked.warnings
    assert "report impression: model output not usable (replacement characters)" in checked.warnings
    assert result.with_text_checks() is result  # clean text: nothing added
    assert checked.with_text_checks().warnings == checked.warnings  # idempotent


def test_degenerate_report_is_shown_as_not_usable_and_warned_about() -> None:
    source = rg1_source()
    result = dataclasses.replace(make_result(source, n_findings=1), report=Report("no no no no no no no no", "Fine.\x15", "raw"))
    bundle = assemble_bundle(source, result, ("text_sr",), uid_root=UID_ROOT, analysis_version=1)
    text_sr = bundle.objects[0].dataset
    texts = [i.ContentSequence[0].TextValue for i in text_sr.ContentSequence if i.ValueType == "CONTAINER"][:2]
    assert NOT_USABLE in texts[0] and "no no no" not in texts[0]
    assert texts[1].endswith("Fine.")  # the impression was usable once cleaned
    assert any(w.startswith("report findings: model output not usable (repetition loop)") for w in bundle.warnings)


def test_default_repertoire_objects_carry_no_specific_character_set() -> None:
    source = rg1_source()
    del source.SpecificCharacterSet  # RG1 says ISO_IR 100; a source in the default repertoire says nothing
    bundle = assemble_bundle(source, make_result(source, n_findings=2), SEND_ORDER, uid_root=UID_ROOT, analysis_version=1)
    for built in bundle.objects:
        assert "SpecificCharacterSet" not in built.dataset, built.kind
    source.SpecificCharacterSet = "ISO_IR 6"  # not a defined term, but seen in the field: still left out
    assert (
        "SpecificCharacterSet"
        not in assemble_bundle(source, make_result(source, n_findings=2), ("sr",), uid_root=UID_ROOT, analysis_version=1).objects[0].dataset
    )


def test_gsps_and_seg_content_descriptions_are_whole_words() -> None:
    source = rg1_source()
    bundle = assemble_bundle(source, make_result(source, n_findings=2), ("seg", "gsps"), uid_root=UID_ROOT, analysis_version=1)
    for built in bundle.objects:
        description = built.dataset.ContentDescription
        assert not description.endswith("..."), description  # short enough not to be cut at all
        assert "NOT FOR CLINICAL USE" in description


def test_objects_from_a_lossy_j2k_source_say_so_with_ratio_and_method() -> None:
    source = pydicom.dcmread(get_testdata_file("RG1_J2KI.dcm"))
    bundle = assemble_bundle(source, make_result(source, n_findings=2), ("seg", "sc"), uid_root=UID_ROOT, analysis_version=1)
    for built in bundle.objects:
        ds = built.dataset
        methods = ds.data_element("LossyImageCompressionMethod").value
        methods = [methods] if isinstance(methods, str) else list(methods)
        assert ds.LossyImageCompression == "01" and methods[0] == "ISO_15444_1", built.kind
        assert "LossyImageCompressionRatio" in ds, built.kind
    plain = assemble_bundle(rg1_source(), make_result(rg1_source(), n_findings=2), ("seg",), uid_root=UID_ROOT, analysis_version=1)
    assert plain.objects[0].dataset.get("LossyImageCompression", "00") == "00"
