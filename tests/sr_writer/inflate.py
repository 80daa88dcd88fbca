"""dicom3tools cannot read Deflated Explicit VR Little Endian (our SEG's encoding): inflate a copy first.

The deflate is only the dataset's encoding on disk; DCMTK's ``dcmconv +te`` writes the same dataset in
Explicit VR Little Endian, which is what the validators then check (and what a receiver that does not
accept deflate gets on the wire).
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.uid import DeflatedExplicitVRLittleEndian

from tests.support import validators
from tests.support.dcmtk import transcode


def inflated(path: Path) -> Path:
    """``path`` itself, or an Explicit VR Little Endian copy beside it when it is deflated."""
    meta = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    if str(meta.file_meta.TransferSyntaxUID) != DeflatedExplicitVRLittleEndian:
        return path
    target = path.with_name(path.stem + ".inflated.dcm")
    if not target.exists():
        transcode("dcmconv", path, target, "+te")
    return target


def run_dciodvfy(path: Path) -> validators.Report:
    return validators.run_dciodvfy(inflated(path))


def run_dcentvfy(paths: list[Path]) -> validators.Report:
    return validators.run_dcentvfy([inflated(p) for p in paths])
