"""Every object of the bundle passes the validators vendors use (real subprocesses)."""

from __future__ import annotations

import dataclasses

import pytest

from sr_writer.bundle import SEND_ORDER, assemble_bundle, comprehensive_sr_fallback
from sr_writer.context import make_context
from tests.sr_writer.conftest import UID_ROOT, BuiltCase
from tests.sr_writer.false_positives import split_model_output_problems
from tests.sr_writer.shapes import SHAPES, BuiltShape, build_shapes
from tests.support.results import make_result, rg1_source
from tests.support.validators import (
    run_dcentvfy,
    run_dciodvfy,
    run_dcmpschk,
    run_dsrdump,
    run_pixelmed_batch,
    run_pixelmed_sr_validator,
)

KINDS = ("sr", "seg", "text_sr", "gsps", "sc", "kos")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> list[BuiltShape]:
    """Every result shape (tests/sr_writer/shapes.py) with every kind, built once."""
    return build_shapes(tmp_path_factory.mktemp("validator-shapes"))


def test_every_object_of_every_shape_has_no_validator_error(shapes: list[BuiltShape]) -> None:
    """dciodvfy on every object, pixelmed's DicomInstanceValidator on both SEGs and its DicomSRValidator
    on both SRs (one JVM each), for 0 / 1 / many / ungrounded findings, CR and DX, with and without
    pixel spacing, MONOCHROME1 and 2."""
    assert [b.shape for b in shapes] == list(SHAPES)
    problems: dict[str, list[str]] = {}
    for built in shapes:
        for kind, path in built.paths.items():
            report = run_dciodvfy(path)
            if report.problems:
                problems[f"{built.shape.name}/{kind} dciodvfy"] = report.problems
    segs = [b.paths[k] for b in shapes for k in ("seg", "anatomy_seg") if k in b.paths]
    srs = [b.paths[k] for b in shapes for k in ("sr", "text_sr")]
    pixelmed = {**run_pixelmed_batch("iod", segs), **run_pixelmed_batch("sr", srs)}
    for path, report in pixelmed.items():
        remaining = split_model_output_problems(report)[0]
        if remaining:
            problems[f"{path.parent.name}/{path.stem} {report.tool}"] = remaining
    assert not problems, problems
    # Not vacuous: the two normal studies have no findings SEG; every SEG and SR was read by pixelmed.
    assert len(segs) == 3 + 5 and len(srs) == 10 and len(pixelmed) == 18
    assert all("Found" in r.output for r in pixelmed.values())


@pytest.mark.parametrize("kind", KINDS)
def test_dciodvfy_reports_no_error(case: BuiltCase, kind: str) -> None:
    report = run_dciodvfy(case.paths[kind])
    assert case.paths[kind].stat().st_size > 0
    assert "Error" not in "\n".join(report.problems), report.describe()
    assert not report.problems, report.describe()


def test_dcentvfy_finds_the_bundle_consistent_with_the_source(case: BuiltCase) -> None:
    report = run_dcentvfy([case.source_path, *case.paths.values()])
    assert not report.problems, report.describe()


def test_dcmpschk_accepts_the_gsps(case: BuiltCase) -> None:
    report = run_dcmpschk(case.paths["gsps"])
    assert not report.problems, report.describe()
    assert "Test passed." in report.output


@pytest.mark.parametrize("kind", ["sr", "text_sr", "kos"])
def test_dsrdump_reads_the_structured_documents(case: BuiltCase, kind: str) -> None:
    report = run_dsrdump(case.paths[kind])
    assert not report.problems, report.describe()


def test_dsrdump_shows_preliminary_unverified_and_the_findings(case: BuiltCase) -> None:
    output = run_dsrdump(case.paths["sr"]).output
    assert "PRELIMINARY" in output and "UNVERIFIED" in output
    assert "Imaging Measurement Report" in output and "POLYLINE" in output
    measurements = [i for i in case.dataset("sr").ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"][0]
    assert output.count('"Measurement Group"') == len(measurements.ContentSequence)
    assert '"Qualitative Evaluations"' in output


@pytest.mark.parametrize("kind", ["sr", "text_sr"])
def test_pixelmed_sr_validator_only_reports_known_false_positives(case: BuiltCase, kind: str) -> None:
    report = run_pixelmed_sr_validator(case.paths[kind])
    problems, model_output_lines = split_model_output_problems(report)
    assert not problems, report.describe()
    assert "Root Template Validation Complete" in report.output
    # The model-output allow-list is used by exactly the items we add, one line per item: the sentences
    # of the regions the SR holds (those a finding is grounded to); in the text SR the section, its note
    # and one line per label and per sentence (all 36).
    ctx = make_context(case.source, case.result, uid_root=UID_ROOT, analysis_version=1)
    expected = sum(1 for a in ctx.sr_boxed if a.is_region) if kind == "sr" else 1 + 1 + len(case.result.image_labels) + 36
    assert len(model_output_lines) == expected, report.describe()


def test_comprehensive_sr_fallback_validates(case: BuiltCase, tmp_path) -> None:
    fallback = comprehensive_sr_fallback(case.dataset("sr"))
    path = tmp_path / "sr-88.33.dcm"
    fallback.save_as(path, enforce_file_format=True)
    assert not run_dciodvfy(path).problems, run_dciodvfy(path).describe()
    assert not run_dsrdump(path).problems
    pixelmed = run_pixelmed_sr_validator(path)
    assert not split_model_output_problems(pixelmed)[0], pixelmed.describe()


def test_results_without_image_labels_or_sentences_validate_and_add_nothing(tmp_path) -> None:
    """An empty label dict and regions without sentences: no extra content, no error, no new problem
    (every region in the SR, so that no note of regions left out is written either)."""
    source = rg1_source()
    base = make_result(source, n_findings=3, image_labels={})
    result = dataclasses.replace(base, regions=tuple(dataclasses.replace(r, retrieved_sentence=None) for r in base.regions))
    bundle = assemble_bundle(source, result, ("sr", "text_sr"), uid_root=UID_ROOT, analysis_version=1, sr_anatomy="all")
    for built in bundle.objects:
        path = tmp_path / f"{built.kind}.dcm"
        built.dataset.save_as(path, enforce_file_format=True)
        assert not run_dciodvfy(path).problems, run_dciodvfy(path).describe()
        assert not run_dsrdump(path).problems
        pixelmed = run_pixelmed_sr_validator(path)
        problems, model_output_lines = split_model_output_problems(pixelmed)
        assert not problems and not model_output_lines, pixelmed.describe()
        assert "Comment" not in run_dsrdump(path).output


def test_sr_of_image_labels_alone_validates_and_text_sr_keeps_unlocated_regions_sentences(tmp_path) -> None:
    """No region located and no finding: the labels alone make a valid SR (no box, so no SEG/GSPS/SC),
    and the text SR still lists the sentences of regions the model did not locate."""
    source = rg1_source()
    base = make_result(source, n_findings=0)
    result = dataclasses.replace(base, regions=tuple(dataclasses.replace(r, box=None) for r in base.regions))
    bundle = assemble_bundle(source, result, SEND_ORDER, uid_root=UID_ROOT, analysis_version=1)
    assert [o.kind for o in bundle.objects] == ["sr", "text_sr", "kos"]
    for built in bundle.objects:
        path = tmp_path / f"{built.kind}.dcm"
        built.dataset.save_as(path, enforce_file_format=True)
        assert not run_dciodvfy(path).problems, run_dciodvfy(path).describe()
        if built.kind != "kos":
            pixelmed = run_pixelmed_sr_validator(path)
            assert not split_model_output_problems(pixelmed)[0], pixelmed.describe()
    output = run_dsrdump(tmp_path / "sr.dcm").output
    # No located box: one whole-image group stating "No abnormality" (OHIF 3.13 crashes on a report
    # without a group); the 14 labels are TEXT items of the Qualitative Evaluations container.
    assert output.count('"Measurement Group"') == 1 and output.count("POLYLINE") == 1 and '"No abnormality"' in output
    assert '"Qualitative Evaluations"' in output and '"Imaging Measurements"' in output
    sr = next(o.dataset for o in bundle.objects if o.kind == "sr")
    texts = [i.TextValue for i in sr.ContentSequence[-1].ContentSequence]
    assert sum(": image-level probability " in t for t in texts) == len(result.image_labels) == 14
    text_sr = next(o.dataset for o in bundle.objects if o.kind == "text_sr")
    outputs = [i for i in text_sr.ContentSequence if i.get("ValueType") == "CONTAINER"][-1]
    assert len(outputs.ContentSequence) == 1 + 14 + 36
