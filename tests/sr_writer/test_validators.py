"""Every object of the bundle passes the validators vendors use (real subprocesses)."""

from __future__ import annotations

import pytest

from sr_writer.bundle import comprehensive_sr_fallback
from tests.sr_writer.conftest import BuiltCase
from tests.support.validators import run_dcentvfy, run_dciodvfy, run_dcmpschk, run_dsrdump, run_pixelmed_sr_validator

KINDS = ("sr", "seg", "text_sr", "gsps", "sc", "kos")


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
    assert output.count('"Measurement Group"') == len(case.bundle.objects[0].dataset.ContentSequence[-1].ContentSequence)


@pytest.mark.parametrize("kind", ["sr", "text_sr"])
def test_pixelmed_sr_validator_only_reports_known_false_positives(case: BuiltCase, kind: str) -> None:
    report = run_pixelmed_sr_validator(case.paths[kind])
    assert not report.problems, report.describe()
    assert "Root Template Validation Complete" in report.output


def test_comprehensive_sr_fallback_validates(case: BuiltCase, tmp_path) -> None:  # noqa: ANN001
    fallback = comprehensive_sr_fallback(case.dataset("sr"))
    path = tmp_path / "sr-88.33.dcm"
    fallback.save_as(path, enforce_file_format=True)
    assert not run_dciodvfy(path).problems, run_dciodvfy(path).describe()
    assert not run_dsrdump(path).problems
    assert not run_pixelmed_sr_validator(path).problems, run_pixelmed_sr_validator(path).describe()
