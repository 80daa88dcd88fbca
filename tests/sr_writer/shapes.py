"""The result shapes every check runs on (issue 20): 0, 1 and many findings, a finding whose region has
no grounding; CR and DX; with and without pixel spacing; MONOCHROME1 and MONOCHROME2.

Each shape is its own study (own Study/Series/SOP Instance UIDs), so one Orthanc holds them all and a
viewer opens each study apart. Built once per session (``built_shapes``): the validators and the OHIF
test read the same files.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pydicom

from inference.result import AnalysisResult, Finding
from sr_writer.bundle import SEND_ORDER, Bundle, assemble_bundle
from tests.support.results import dx_source, make_result, rg1_source, scaled_box

UID_ROOT = "1.2.826.0.1.3680043.10.1431."


@dataclass(frozen=True)
class Shape:
    name: str
    modality: str  # "CR" (MONOCHROME1, RG1) or "DX" (MONOCHROME2)
    spacing: str  # "pixel" (calibrated PixelSpacing), "imager" (ImagerPixelSpacing only) or "none"
    findings: str  # "0", "1", "many" or "ungrounded"
    monochrome: str = ""

    def source(self, number: int) -> pydicom.Dataset:
        ds = rg1_source() if self.modality == "CR" else dx_source()
        for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
            if keyword in ds:
                delattr(ds, keyword)
        if self.spacing == "pixel":
            ds.PixelSpacing = [0.171, 0.171] if self.modality == "CR" else [0.143, 0.143]
        elif self.spacing == "imager":
            ds.ImagerPixelSpacing = [0.143, 0.143]
        if self.monochrome and self.monochrome != ds.PhotometricInterpretation:
            raise ValueError(f"shape {self.name}: the {self.modality} source is {ds.PhotometricInterpretation}")
        base = f"1.2.826.0.1.3680043.10.1431.98.{number}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = f"{base}.1", f"{base}.2"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{base}.3"
        ds.PatientID = f"SHAPE-{number}"
        ds.PatientName = f"Shape^{self.name}"
        ds.AccessionNumber = f"SHAPE{number}"
        return ds

    def result(self, source: pydicom.Dataset) -> AnalysisResult:
        if self.findings == "0":
            return make_result(source, n_findings=0, image_labels={"No Finding": 0.93, "Cardiomegaly": 0.04})
        if self.findings == "1":
            return make_result(source, n_findings=1)
        if self.findings == "many":
            return make_result(source, n_findings=10)
        # A located finding the model grounded to no region, and one it did not locate at all.
        base = make_result(source, n_findings=0)
        columns, rows = int(source.Columns), int(source.Rows)
        ungrounded = Finding(
            index=0, label="Nodule", text="Small nodule.", boxes=(scaled_box((0.62, 0.40, 0.70, 0.47), columns, rows),),
            task="grounded_diagnosis", probability=0.41, region_indices=(),
        )  # fmt: skip
        unlocated = Finding(index=1, label="Pneumothorax", text="No pneumothorax.", boxes=(), task="grounded_diagnosis", probability=0.05, region_indices=())
        return dataclasses.replace(base, findings=(ungrounded, unlocated))


SHAPES = (
    Shape("cr-pixel-0", "CR", "pixel", "0", "MONOCHROME1"),
    Shape("dx-imager-0", "DX", "imager", "0", "MONOCHROME2"),
    Shape("dx-imager-1", "DX", "imager", "1", "MONOCHROME2"),
    Shape("cr-none-many", "CR", "none", "many", "MONOCHROME1"),
    Shape("dx-pixel-ungrounded", "DX", "pixel", "ungrounded", "MONOCHROME2"),
)


@dataclass
class BuiltShape:
    shape: Shape
    source: pydicom.Dataset
    source_path: Path
    result: AnalysisResult
    bundle: Bundle
    paths: dict[str, Path]

    def dataset(self, kind: str) -> pydicom.Dataset:
        return next(o.dataset for o in self.bundle.objects if o.kind == kind)


def build_shapes(directory: Path, kinds: tuple[str, ...] = SEND_ORDER) -> list[BuiltShape]:
    built = []
    for number, shape in enumerate(SHAPES, start=1):
        source = shape.source(number)
        result = shape.result(source)
        bundle = assemble_bundle(source, result, kinds, uid_root=UID_ROOT, analysis_version=1, institution_name="Test Hospital")
        folder = directory / shape.name
        folder.mkdir(parents=True, exist_ok=True)
        source_path = folder / "source.dcm"
        source.save_as(source_path, enforce_file_format=True)
        paths = {}
        for obj in bundle.objects:
            paths[obj.kind] = folder / f"{obj.kind}.dcm"
            obj.dataset.save_as(paths[obj.kind], enforce_file_format=True)
        built.append(BuiltShape(shape, source, source_path, result, bundle, paths))
    return built
