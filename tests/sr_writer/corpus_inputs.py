"""A varied corpus of chest radiograph inputs for the writer, made from the real RG1 pixels.

Sizes from 250 to 4000 px, MONOCHROME1 and 2, 8/12/16 bits stored, CR and DX, calibrated, zero or
missing PixelSpacing, and encodings as they arrive at the node (explicit LE, JPEG baseline and
extended (lossy), JPEG lossless, RLE; transcoded by DCMTK). Each case also carries a model text:
clean, or forced dirty (control characters, special tokens, replacement characters, repetition
loops, empty), so the same corpus proves that whatever the model writes, the objects stay valid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from inference.result import AnalysisResult, Finding, Report
from tests.support.dcmtk import transcode
from tests.support.results import DX_FOR_PRESENTATION, make_result

CR = "1.2.840.10008.5.1.4.1.1.1"
STUDY = "1.2.826.0.1.3680043.8.498.2.7"

#: Dirty model texts: name -> (findings, impression).
DIRTY_TEXTS: dict[str, tuple[str, str]] = {
    "clean": ("The cardiac silhouette is enlarged. No pneumothorax.", "Cardiomegaly."),
    "control_chars": ("The heart\x15 is enlarged.\x00\x07 Lungs\x1b clear.\r\nNo effusion.\x0c", "Cardio\x15megaly."),
    "special_tokens": ("<emb><emb> Opacity in <obj_12> and <obj_20>. </s><pad>", "<|endoftext|>Pneumonia <obj_99>."),
    "replacement_chars": ("\ufffd\ufffd\ufffd\ufffd\ufffd\ufffd lungs \ufffd\ufffd", "Normal\ufffd."),
    "repetition": ("No acute disease. " * 40, "the the the the the the the the the"),
    "empty": ("   ", ""),
    "mixed": ("Findings:\t<obj_3>\x15 " + "effusion " * 12 + "\ufffd", "Impression \x02 <emb>"),
}


@dataclass(frozen=True)
class CorpusCase:
    name: str
    rows: int
    columns: int
    photometric: str
    bits_stored: int
    modality: str
    encoding: str  # "explicit", "jpeg_baseline", "jpeg_extended", "jpeg_lossless", "rle"
    spacing: str  # "valid", "zero", "none"
    text: str  # key of DIRTY_TEXTS


def corpus_cases() -> list[CorpusCase]:
    sizes = [
        (250, 300),
        (300, 256),
        (256, 330),
        (400, 400),
        (512, 640),
        (800, 600),
        (1024, 1024),
        (1500, 1200),
        (2048, 1700),
        (700, 900),
        (2600, 2100),
        (4000, 3200),
    ]
    texts = list(DIRTY_TEXTS)
    cases = []
    combos = [
        ("MONOCHROME1", 16, "CR", "explicit", "zero"),
        ("MONOCHROME2", 8, "DX", "jpeg_baseline", "valid"),
        ("MONOCHROME2", 12, "DX", "jpeg_extended", "valid"),
        ("MONOCHROME1", 12, "CR", "jpeg_lossless", "none"),
        ("MONOCHROME2", 16, "DX", "rle", "valid"),
        ("MONOCHROME1", 8, "CR", "jpeg_baseline", "valid"),
        ("MONOCHROME2", 12, "CR", "explicit", "none"),
    ]
    index = 0
    for size_number, (rows, columns) in enumerate(sizes):
        # Three combos per size (rotating), so every size meets several encodings and bit depths.
        for k in range(3):
            photometric, bits, modality, encoding, spacing = combos[(size_number * 3 + k) % len(combos)]
            if rows * columns > 4_000_000 and k > 0:
                continue  # one very large case is enough (and keeps the suite's time sane)
            text = texts[index % len(texts)]
            name = f"{index:02d}_{rows}x{columns}_{photometric[-1]}_{bits}b_{modality}_{encoding}_{text}"
            cases.append(CorpusCase(name, rows, columns, photometric, bits, modality, encoding, spacing, text))
            index += 1
    return cases


def _rg1_pixels() -> np.ndarray:
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    return ds.pixel_array.astype(np.float64)


def make_source(case: CorpusCase, directory: Path, base: np.ndarray | None = None) -> Path:
    """The case's source image as a Part 10 file in its encoding."""
    base = _rg1_pixels() if base is None else base
    rows_index = np.linspace(0, base.shape[0] - 1, case.rows).astype(int)
    columns_index = np.linspace(0, base.shape[1] - 1, case.columns).astype(int)
    pixels = base[np.ix_(rows_index, columns_index)]  # RG1 is MONOCHROME1: high = dark
    pixels = (pixels - pixels.min()) / max(float(np.ptp(pixels)), 1.0)
    if case.photometric == "MONOCHROME2":
        pixels = 1.0 - pixels
    top = 2**case.bits_stored - 1
    stored = np.round(pixels * top).astype(np.uint8 if case.bits_stored == 8 else np.uint16)
    number = int(case.name[:2])
    ds = pydicom.Dataset()
    sop_class = CR if case.modality == "CR" else DX_FOR_PRESENTATION
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = f"{STUDY}.2.{number + 1}"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = f"{STUDY}.1.{number + 1}"
    ds.Modality = case.modality
    ds.PatientName = "Corpus^Case"
    ds.PatientID = "CORPUS-01"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "A1"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber, ds.InstanceNumber = number + 1, 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if case.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageLaterality = "U"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if case.photometric == "MONOCHROME2" else -1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
        ds.ImagerPixelSpacing = [0.15, 0.15]
        ds.DetectorType = "SCINTILLATOR"
        ds.BurnedInAnnotation = "NO"
    if case.spacing == "valid":
        ds.PixelSpacing = [round(0.15 * 1841 / case.columns, 4)] * 2
    elif case.spacing == "zero":
        ds.PixelSpacing = [0, 0]
    ds.Rows, ds.Columns = case.rows, case.columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = case.photometric
    ds.BitsAllocated = 8 if case.bits_stored == 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = case.bits_stored, case.bits_stored - 1, 0
    ds.WindowCenter, ds.WindowWidth = (top + 1) // 2, top + 1
    ds.PixelData = stored.tobytes()
    plain = directory / f"{case.name}.plain.dcm"
    ds.save_as(plain, enforce_file_format=True)
    target = directory / f"{case.name}.dcm"
    options = {
        "jpeg_baseline": ("dcmcjpeg", ("+eb",)),
        "jpeg_extended": ("dcmcjpeg", ("+ee",)),
        "jpeg_lossless": ("dcmcjpeg", ("+e1",)),
        "rle": ("dcmcrle", ()),
    }
    if case.encoding == "explicit":
        plain.rename(target)
    else:
        tool, extra = options[case.encoding]
        transcode(tool, plain, target, *extra)
        plain.unlink()
    return target


def dirty_result(source: pydicom.Dataset, case: CorpusCase) -> AnalysisResult:
    """The factory result with the case's model text in the report, in a finding's label and text."""
    result = make_result(source, n_findings=8)
    findings_text, impression = DIRTY_TEXTS[case.text]
    report = Report(findings=findings_text, impression=impression, raw_text=findings_text + impression)
    findings = list(result.findings)
    findings[0] = dataclasses.replace(findings[0], text=findings_text, label=impression or findings[0].label)
    findings.append(Finding(len(findings), impression, findings_text, (), "grounded_captioning", None))
    return dataclasses.replace(result, report=report, findings=tuple(findings))
