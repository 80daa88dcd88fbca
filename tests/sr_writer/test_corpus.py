"""dciodvfy finds no error in any object of the full bundle over a varied corpus, dirty model text included."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pydicom
import pytest

from sr_writer.bundle import SEND_ORDER, assemble_bundle
from sr_writer.text import NOT_USABLE
from tests.sr_writer.conftest import UID_ROOT
from tests.sr_writer.corpus_inputs import DIRTY_TEXTS, corpus_cases, dirty_result, make_source
from tests.support.validators import run_dciodvfy

CASES = corpus_cases()
TEXT_VRS = {"UT", "LT", "ST"}
ALLOWED_TEXT_CONTROLS = {"\r", "\n", "\f", "\t"}


def test_the_corpus_is_as_varied_as_promised() -> None:
    assert len(CASES) >= 30
    sizes = [min(c.rows, c.columns) for c in CASES] + [max(c.rows, c.columns) for c in CASES]
    assert min(sizes) <= 256 and max(sizes) >= 4000
    assert {c.photometric for c in CASES} == {"MONOCHROME1", "MONOCHROME2"}
    assert {c.bits_stored for c in CASES} == {8, 12, 16}
    assert {"jpeg_baseline", "jpeg_extended", "jpeg_lossless"} <= {c.encoding for c in CASES}
    assert set(DIRTY_TEXTS) == {c.text for c in CASES}


def text_problems(dataset: pydicom.Dataset) -> list[str]:
    """Every text value in the object (nested too) that holds a forbidden character or a special token."""
    problems = []

    def visit(ds: pydicom.Dataset) -> None:
        for element in ds:
            if element.VR == "SQ":
                for item in element.value:
                    visit(item)
                continue
            if element.VR not in {"UT", "LT", "ST", "LO", "SH", "PN", "CS", "UC"}:
                continue
            values = element.value if isinstance(element.value, (list, pydicom.multival.MultiValue)) else [element.value]
            for value in values:
                text = str(value)
                for char in text:
                    if unicodedata.category(char) == "Cc" and not (element.VR in TEXT_VRS and char in ALLOWED_TEXT_CONTROLS):
                        problems.append(f"{element.keyword}: control character {ord(char):#04x} in {text[:60]!r}")
                    if char == "\ufffd":
                        problems.append(f"{element.keyword}: U+FFFD in {text[:60]!r}")
                for token in ("<emb>", "<obj_", "</s>", "<pad>", "<|endoftext|>"):
                    if token in text:
                        problems.append(f"{element.keyword}: special token {token} in {text[:60]!r}")

    visit(dataset)
    return problems


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("writer-corpus")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_object_of_the_bundle_passes_dciodvfy_and_holds_clean_text(case, corpus_dir: Path) -> None:
    source_path = make_source(case, corpus_dir)
    source = pydicom.dcmread(source_path)
    result = dirty_result(source, case)
    bundle = assemble_bundle(source, result, SEND_ORDER, uid_root=UID_ROOT, analysis_version=1)
    assert [o.kind for o in bundle.objects] == list(SEND_ORDER)
    for built in bundle.objects:
        path = corpus_dir / f"{case.name}.{built.kind}.dcm"
        built.dataset.save_as(path, enforce_file_format=True)
        report = run_dciodvfy(path)
        assert not report.problems, f"{built.kind}: " + report.describe()
        written = pydicom.dcmread(path)
        assert text_problems(written) == [], built.kind
        assert written.get("SpecificCharacterSet") != "ISO_IR 6", built.kind
        for leftover in corpus_dir.glob(f"{case.name}.{built.kind}*.dcm"):
            leftover.unlink()  # large corpus: keep the temp dir small
    text_sr = next(o.dataset for o in bundle.objects if o.kind == "text_sr")
    findings = next(i for i in text_sr.ContentSequence if i.ValueType == "CONTAINER" and i.ConceptNameCodeSequence[0].CodeValue == "59776-5")
    shown = findings.ContentSequence[0].TextValue
    degenerate = case.text in ("replacement_chars", "repetition", "mixed")
    assert (NOT_USABLE in shown) == degenerate, shown
    assert any("report findings: model output not usable" in w for w in bundle.warnings) == degenerate, bundle.warnings
    if case.text == "special_tokens":
        assert "Left mid lung zone" in shown and "Right lung" in shown  # <obj_i> named, not dropped
    lossy = case.encoding in ("jpeg_baseline", "jpeg_extended")
    for kind in ("seg", "sc"):
        obj = next(o.dataset for o in bundle.objects if o.kind == kind)
        if lossy:
            assert obj.LossyImageCompression == "01", kind
            methods = obj.data_element("LossyImageCompressionMethod").value
            ratios = obj.data_element("LossyImageCompressionRatio").value
            methods = [methods] if isinstance(methods, str) else list(methods)
            ratios = list(ratios) if isinstance(ratios, (list, pydicom.multival.MultiValue)) else [ratios]
            assert methods[0] == "ISO_10918_1" and float(ratios[0]) > 1 and len(methods) == len(ratios), kind
    source_path.unlink()
