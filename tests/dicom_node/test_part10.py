"""Our File Meta encoder against pynetdicom's (pydicom-written) one, byte for byte."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from dicom_node.net.part10 import PREAMBLE, part10_header


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax"),
    [
        ("1.2.840.10008.5.1.4.1.1.1", "1.2.3.4", "1.2.840.10008.1.2.1"),  # even-length UIDs
        ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.45", "1.2.840.10008.1.2"),  # odd ones: NUL padding
        ("1.3.12.2.1107.5.9.1", "2.25." + "9" * 59, "1.2.840.10008.1.2.4.201"),  # 64-character UID
        ("1.2.840.10008.5.1.4.1.1.88.34", "1.2.826.0.1.3680043.8.498.1", "1.2.840.10008.1.2.1.99"),
    ],
)
def test_header_is_byte_identical_to_pynetdicoms(sop_class: str, sop_instance: str, syntax: str) -> None:
    expected = PREAMBLE + encode_file_meta(create_file_meta(sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_instance), transfer_syntax=UID(syntax)))
    assert part10_header(sop_class, sop_instance, syntax) == expected


def test_header_reads_back_with_pydicom() -> None:
    header = part10_header("1.2.840.10008.5.1.4.1.1.1", "1.2.3.45", "1.2.840.10008.1.2.1")
    meta = pydicom.filereader.read_preamble(io.BytesIO(header), force=False)
    assert meta == b"\x00" * 128
    ds = pydicom.dcmread(io.BytesIO(header + b""), force=True)
    assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.45"
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert ds.file_meta.FileMetaInformationGroupLength == len(header) - 132 - 12
