"""What each kind of receiver gets, by the node's own SCU negotiation (``delivery._contexts_for`` and
``_send_one``), per result shape and the default ``full`` profile:

* DCMTK storescp with its defaults (uncompressed transfer syntaxes only, like many older PACS):
  the SC decompressed, the findings SEG as a BINARY SEG (1 bit per pixel);
* storescp accepting Deflated Explicit VR LE but no JPEG (``+xd``): the SEG and SC deflated;
* storescp accepting everything (``+xa``): the stored JPEG-LS SEG and JPEG SC as they are.

The bytes each receiver wrote are summed per image. Budgets (issue 20): under 5 MB uncompressed for
up to 4 finding boxes (the many-findings shape, 9 full-size boxes, is reported, see docs/results.md),
under 1 MB where JPEG-LS is accepted, under 1.2 MB where only Deflate is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pynetdicom import AE

from dicom_node.pipeline.delivery import _contexts_for, _send_one
from dicom_node.settings import DEFAULT_PROFILES
from sr_writer.bundle import comprehensive_sr_fallback
from tests.sr_writer.shapes import BuiltShape, build_shapes
from tests.support.dcmtk import StoreScp

#: storescp transfer syntax options per receiver kind.
RECEIVERS = {"uncompressed": (), "deflate": ("+xd",), "all": ("+xa",)}
MB = 1_000_000


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> list[BuiltShape]:
    return build_shapes(tmp_path_factory.mktemp("receiver-shapes"), DEFAULT_PROFILES["full"])


def deliver(shapes: list[BuiltShape], receiver: str, directory: Path) -> dict[str, dict[str, int]]:
    """Send every shape's bundle over one association; bytes storescp wrote, per shape and SOP class."""
    scp = StoreScp(output_dir=directory / receiver, ae_title="PLAINPACS", syntaxes=RECEIVERS[receiver]).start()
    try:
        datasets = [o.dataset for built in shapes for o in built.bundle.objects]
        scu = AE(ae_title="ANATOMIX")
        scu.requested_contexts = _contexts_for(datasets)  # what the node's SCU proposes
        assoc = scu.associate("127.0.0.1", scp.port, ae_title="PLAINPACS")
        assert assoc.is_established
        try:
            outcomes = [_send_one(assoc, ds, comprehensive_sr_fallback) for ds in datasets]
        finally:
            assoc.release()
    finally:
        scp.stop()
    assert {o.outcome for o in outcomes} == {"sent"}, outcomes
    sizes: dict[str, dict[str, int]] = {}
    by_patient = {str(b.source.PatientID): b.shape.name for b in shapes}
    for path in (directory / receiver).iterdir():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sizes.setdefault(by_patient[str(ds.PatientID)], {})[str(ds.Modality)] = path.stat().st_size
    return sizes


def test_uncompressed_receiver_gets_a_binary_seg_and_a_small_bundle(shapes: list[BuiltShape], tmp_path: Path) -> None:
    sizes = deliver(shapes, "uncompressed", tmp_path)
    received = {p.name: pydicom.dcmread(p) for p in (tmp_path / "uncompressed").iterdir()}
    segs = [ds for ds in received.values() if ds.Modality == "SEG"]
    assert len(segs) == 3 and all(ds.SegmentationType == "BINARY" and ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian for ds in segs)
    for seg in segs:  # the same masks as the stored pseudo-binary SEG
        built = next(b for b in shapes if str(b.source.PatientID) == str(seg.PatientID))
        assert np.array_equal(seg.pixel_array.reshape(-1, seg.Rows, seg.Columns) > 0, built.dataset("seg").pixel_array.reshape(-1, seg.Rows, seg.Columns) > 0)
    sc = next(ds for ds in received.values() if ds.Modality == "OT")
    assert sc.PhotometricInterpretation == "RGB" and sc.pixel_array.shape == (sc.Rows, sc.Columns, 3)
    totals = {name: sum(kinds.values()) for name, kinds in sizes.items()}
    boxes = {
        b.shape.name: len([a for a in b.dataset("sr").ContentSequence if a.ConceptNameCodeSequence[0].CodeValue == "126010"][0].ContentSequence) for b in shapes
    }
    for name, total in totals.items():
        if boxes[name] <= 4:
            assert total < 5 * MB, (name, sizes[name])
    assert totals["cr-none-many"] < 8 * MB, sizes["cr-none-many"]  # 9 full-size boxes: see docs/results.md
    assert sizes["cr-pixel-0"]["OT"] > 1 * MB  # not vacuous: the SC really was decompressed


@pytest.mark.parametrize("receiver", ["deflate", "all"])
def test_a_receiver_taking_a_lossless_compression_gets_under_1_mb_per_image(shapes: list[BuiltShape], receiver: str, tmp_path: Path) -> None:
    sizes = deliver(shapes, receiver, tmp_path)
    assert len(sizes) == len(shapes)
    # JPEG-LS/JPEG ("all"): under 1 MB. Deflate only: the SC's RGB pixels (1024 px long side) deflate to
    # ~0.9 MB, so the many-findings image comes to ~1.1 MB (docs/results.md).
    budget = 1 * MB if receiver == "all" else 1.2 * MB
    for name, kinds in sizes.items():
        assert sum(kinds.values()) < budget, (name, kinds)
    syntaxes = {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in (tmp_path / receiver).iterdir()}
    expected = pydicom.uid.DeflatedExplicitVRLittleEndian if receiver == "deflate" else pydicom.uid.JPEGLSLossless
    assert expected in syntaxes, syntaxes
