"""Shared fixtures: the full bundle for the real RG1 chest CR and for a MONOCHROME2 DX, built once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from inference.result import AnalysisResult
from sr_writer.bundle import SEND_ORDER, Bundle, assemble_bundle
from tests.support.results import dx_source, make_result, rg1_source

UID_ROOT = "1.2.826.0.1.3680043.10.1431."


@dataclass
class BuiltCase:
    name: str
    source: pydicom.Dataset
    source_path: Path
    result: AnalysisResult
    bundle: Bundle
    paths: dict[str, Path]

    def dataset(self, kind: str) -> pydicom.Dataset:
        return next(o.dataset for o in self.bundle.objects if o.kind == kind)


def build_case(name: str, source: pydicom.Dataset, directory: Path, n_findings: int = 8) -> BuiltCase:
    result = make_result(source, n_findings=n_findings)
    bundle = assemble_bundle(source, result, SEND_ORDER, uid_root=UID_ROOT, analysis_version=1, institution_name="Test Hospital")
    directory.mkdir(parents=True, exist_ok=True)
    source_path = directory / "source.dcm"
    source.save_as(source_path, enforce_file_format=True)
    paths = {}
    for built in bundle.objects:
        path = directory / f"{built.kind}.dcm"
        built.dataset.save_as(path, enforce_file_format=True)
        paths[built.kind] = path
    return BuiltCase(name, source, source_path, result, bundle, paths)


@pytest.fixture(scope="session", params=["rg1", "dx"])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> BuiltCase:
    source = rg1_source() if request.param == "rg1" else dx_source()
    return build_case(request.param, source, tmp_path_factory.mktemp(f"bundle-{request.param}"))


def group_sites(group) -> list:
    """A measurement group's finding sites: the group's own (regions, whole-image statements), else its
    probability NUM's (a finding box with a probability: OHIF then labels the box with the finding)."""
    return list(group.finding_sites) or [site for measurement in group.get_measurements() for site in measurement.finding_sites]


def read_seg(path) -> hd.seg.Segmentation:
    """highdicom's ``segread``, also for our SEG of a source without pixel spacing: its Pixel Measures
    item is empty (OHIF needs the item; no spacing is invented), which highdicom 0.28 cannot parse."""
    ds = pydicom.dcmread(path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    if "PixelMeasuresSequence" in shared and "PixelSpacing" not in shared.PixelMeasuresSequence[0]:
        del shared.PixelMeasuresSequence
    return hd.seg.Segmentation.from_dataset(ds)
