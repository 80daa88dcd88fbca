"""Real test images: the chest CR RG1 (pydicom-data) in many transfer syntaxes, and generated sets.

RG1 variants are transcoded from the real pixels with DCMTK (lossless: decoding gives the same
pixels); JPEG 2000 comes from pydicom-data's own RG1_J2KR/RG1_J2KI (DCMTK 3.6.7 has no J2K
encoder). Every variant gets its own SOP Instance UID (same study), so one push stores them as
distinct instances. Built once per test session in a temp dir.

Use in a test module::

    from tests.support.corpus import rg1_corpus  # noqa: F401 (fixture)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from tests.support.dcmtk import transcode

#: Study Instance UID of the corpus (a test root, not RG1's own, so tests never collide with it).
CORPUS_STUDY_UID = "1.2.826.0.1.3680043.8.498.2.1"
CORPUS_UID_ROOT = "1.2.826.0.1.3680043.8.498.2.2."

#: name -> (DCMTK tool, options) applied to the explicit-LE base; None = taken from pydicom-data.
VARIANTS: dict[str, tuple[str, tuple[str, ...]] | None] = {
    "explicit_le": ("dcmconv", ("+te",)),
    "implicit_le": ("dcmconv", ("+ti",)),
    "big_endian": ("dcmconv", ("+tb",)),
    "deflated": ("dcmconv", ("+td",)),
    "jpeg_lossless_sv1": ("dcmcjpeg", ("+e1",)),
    "jpeg_lossless_p14": ("dcmcjpeg", ("+el",)),
    "jpeg_ls_lossless": ("dcmcjpls", ("+el",)),
    "jpeg_ls_near_lossless": ("dcmcjpls", ("+en",)),
    "rle": ("dcmcrle", ()),
    "j2k_lossless": None,
    "j2k_lossy": None,
}
_PYDICOM_DATA = {"j2k_lossless": "RG1_J2KR.dcm", "j2k_lossy": "RG1_J2KI.dcm"}


@dataclass(frozen=True)
class CorpusFile:
    name: str
    path: Path
    transfer_syntax: UID
    sop_instance_uid: str


def _restamp(source: Path, target: Path, index: int) -> Path:
    """Copy with our study UID and a distinct SOP Instance UID, Dataset Trailing Padding dropped."""
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = CORPUS_STUDY_UID
    ds.SeriesInstanceUID = CORPUS_STUDY_UID + ".1"
    ds.SOPInstanceUID = f"{CORPUS_UID_ROOT}{index}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if (0xFFFC, 0xFFFC) in ds:
        del ds[0xFFFC, 0xFFFC]  # senders drop it; keep the source equal to what goes on the wire
    ds.save_as(target, enforce_file_format=True)
    return target


def build_rg1_corpus(directory: Path) -> dict[str, CorpusFile]:
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, CorpusFile] = {}
    for index, (name, recipe) in enumerate(VARIANTS.items(), start=1):
        target = directory / f"rg1_{name}.dcm"
        if recipe is None:
            # Written once more by DCMTK (same syntax) so the file holds DCMTK's own encoding of the
            # header, which is what DCMTK senders put on the wire.
            base = _restamp(Path(get_testdata_file(_PYDICOM_DATA[name])), directory / f"base_{index}.dcm", index)
            transcode("dcmconv", base, target)
            base.unlink()
        else:
            base = _restamp(Path(get_testdata_file("RG1_UNCR.dcm")), directory / f"base_{index}.dcm", index)
            tool, options = recipe
            transcode(tool, base, target, *options)
            base.unlink()
        meta = pydicom.dcmread(target, stop_before_pixels=True)
        files[name] = CorpusFile(name, target, UID(meta.file_meta.TransferSyntaxUID), str(meta.SOPInstanceUID))
    return files


@pytest.fixture(scope="session")
def rg1_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CorpusFile]:
    return build_rg1_corpus(tmp_path_factory.mktemp("rg1_corpus"))


# ---- generated instances ----------------------------------------------------------------------


def synthetic_cr(
    study_uid: str,
    sop_instance_uid: str,
    rows: int = 64,
    columns: int = 64,
    seed: int = 0,
    sop_class_uid: str = "1.2.840.10008.5.1.4.1.1.1",
    view_position: str = "PA",
    body_part: str = "CHEST",
) -> Dataset:
    """A small, valid, distinct projection radiograph (16-bit MONOCHROME2, random pixels)."""
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = study_uid + ".1"
    ds.Modality = "CR" if sop_class_uid.endswith(".1.1") else "DX"
    ds.PatientName = "Synthetic^Ingest"
    ds.PatientID = "SYNTH-0001"
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view_position
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.InstanceNumber = seed + 1
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rng.integers(0, 4096, size=(rows, columns), dtype=np.uint16).tobytes()
    return ds


def write_synthetic_set(directory: Path, count: int, study_uid: str | None = None, rows: int = 64, columns: int = 64) -> list[Path]:
    """``count`` distinct instances of one study as Part 10 files (explicit VR little endian)."""
    directory.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    paths = []
    for index in range(count):
        ds = synthetic_cr(study_uid, f"{study_uid}.2.{index + 1}", rows=rows, columns=columns, seed=index)
        path = directory / f"img_{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def encode_dataset(ds: Dataset, implicit_vr: bool = False, little_endian: bool = True) -> bytes:
    """The data set bytes (no preamble, no meta) as they would travel in a P-DATA stream."""
    from io import BytesIO

    from pydicom.filewriter import write_dataset

    buffer = BytesIO()
    write_dataset(_file_like(buffer, implicit_vr, little_endian), ds)
    return buffer.getvalue()


def _file_like(buffer, implicit_vr: bool, little_endian: bool):
    from pydicom.filebase import DicomFileLike

    fp = DicomFileLike(buffer)
    fp.is_implicit_VR = implicit_vr
    fp.is_little_endian = little_endian
    return fp


def write_part10(path: Path, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, dataset_bytes: bytes) -> Path:
    """A Part 10 file with a valid File Meta and *arbitrary* data set bytes after it (for damage tests)."""
    from io import BytesIO

    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    buffer = BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(_file_like(buffer, False, True), meta)
    path.write_bytes(buffer.getvalue() + dataset_bytes)
    return path
