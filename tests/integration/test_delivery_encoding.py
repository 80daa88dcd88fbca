"""Every form delivery may send must encode.

A pynetdicom Storage SCP with its default transfer syntaxes (the demo's PACS: it takes Deflated
Explicit VR Little Endian but no JPEG) gets the palette SC deflated: its LUT descriptors must carry
an explicit VR for that encoding (they did not: pynetdicom could not encode the SC, and the deliver
task failed until its lease expired, again and again).
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicom_node.cli.demo import DEMO_PACS_AE, DemoPacs
from dicom_node.pipeline.delivery import send_objects
from dicom_node.pipeline.delivery_outcomes import OutgoingObject
from dicom_node.store.base import RemoteNode
from sr_writer.bundle import comprehensive_sr_fallback
from tests.sr_writer.shapes import build_shapes


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    shape = build_shapes(tmp_path_factory.mktemp("shapes"))[0]
    return dict(shape.paths)


def _outgoing(kind: str, path: Path) -> OutgoingObject:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return OutgoingObject(str(ds.SOPInstanceUID), str(ds.SOPClassUID), kind, path)


def test_a_deflate_receiver_without_jpeg_gets_the_whole_bundle(tmp_path: Path, bundle: dict[str, Path]) -> None:
    pacs = DemoPacs(tmp_path / "pacs").start()
    try:
        destination = RemoteNode("pacs", DEMO_PACS_AE, "127.0.0.1", pacs.port, role="destination", profile="full")
        outcomes = send_objects(destination, [_outgoing(k, p) for k, p in bundle.items()], calling_ae="ANATOMIX", timeout_s=30,
                                fallback=comprehensive_sr_fallback)  # fmt: skip
    finally:
        pacs.stop()
    assert [o.outcome for o in outcomes] == ["sent"] * len(bundle), outcomes
    stored = {pydicom.dcmread(p).SOPClassUID: pydicom.dcmread(p) for p in (tmp_path / "pacs").rglob("*") if p.is_file()}
    sc = stored[pydicom.uid.SecondaryCaptureImageStorage]
    assert sc.PhotometricInterpretation == "PALETTE COLOR"
    assert sc.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert list(sc.RedPaletteColorLookupTableDescriptor) == [256, 0, 16]
