"""What each kind of receiver gets, by the node's own SCU negotiation (``delivery._contexts_for`` and
``_send_one``), per result shape and the default ``full`` profile:

* DCMTK storescp with its defaults (uncompressed transfer syntaxes only, like many older PACS):
  the SC as PALETTE COLOR (a byte per pixel), the findings SEG as a BINARY SEG (1 bit per pixel);
* storescp accepting Deflated Explicit VR LE but no JPEG (``+xd``): the SEG and the palette SC deflated;
* storescp accepting everything (``+xa``): the stored JPEG-LS SEG and JPEG SC as they are.

The bytes each receiver wrote are summed per image. Budgets (issue 20), for every shape, the
many-findings one (9 full-size finding boxes) included: under 5 MB uncompressed, under 1 MB where a
lossless compression (Deflate, JPEG-LS) is accepted. What the uncompressed receiver stored passes
dciodvfy (and pixelmed for the BINARY SEGs): the converted forms are objects in their own right.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_color_lut
from pynetdicom import AE

from dicom_node.pipeline.delivery import _contexts_for, _send_one
from dicom_node.settings import DEFAULT_PROFILES
from sr_writer.bundle import comprehensive_sr_fallback
from tests.sr_writer.false_positives import split_model_output_problems
from tests.sr_writer.shapes import BuiltShape, build_shapes
from tests.support.dcmtk import StoreScp
from tests.support.validators import run_dciodvfy, run_pixelmed_batch

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
    scs = [ds for ds in received.values() if ds.Modality == "OT"]
    for sc in scs:  # one byte per pixel, and what it shows is the stored SC's rendering
        built = next(b for b in shapes if str(b.source.PatientID) == str(sc.PatientID))
        assert sc.PhotometricInterpretation == "PALETTE COLOR" and sc.pixel_array.shape == (sc.Rows, sc.Columns)
        shown = apply_color_lut(sc.pixel_array, sc).astype(np.int32) // 257
        stored = built.dataset("sc").pixel_array  # decoded by pydicom as RGB
        assert np.abs(shown - stored.astype(np.int32)).mean() < 6, built.shape.name
    totals = {name: sum(kinds.values()) for name, kinds in sizes.items()}
    for name, total in totals.items():
        assert total < 5 * MB, (name, sizes[name])
    assert sizes["cr-none-many"]["SEG"] > 3 * MB  # not vacuous: the many-findings SEG fills its budget
    assert sizes["cr-pixel-0"]["OT"] > 0.8 * MB  # and the SC really was decompressed
    problems = {path.name: run_dciodvfy(path).problems for path in (tmp_path / "uncompressed").iterdir()}
    assert not {name: found for name, found in problems.items() if found}, problems
    seg_paths = [path for path in (tmp_path / "uncompressed").iterdir() if pydicom.dcmread(path, stop_before_pixels=True).Modality == "SEG"]
    pixelmed = run_pixelmed_batch("iod", seg_paths)
    assert len(pixelmed) == 3 and not {p.name: r.problems for p, r in pixelmed.items() if split_model_output_problems(r)[0]}


@pytest.mark.parametrize("receiver", ["deflate", "all"])
def test_a_receiver_taking_a_lossless_compression_gets_under_1_mb_per_image(shapes: list[BuiltShape], receiver: str, tmp_path: Path) -> None:
    sizes = deliver(shapes, receiver, tmp_path)
    assert len(sizes) == len(shapes)
    for name, kinds in sizes.items():
        assert sum(kinds.values()) < 1 * MB, (name, kinds)
    syntaxes = {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in (tmp_path / receiver).iterdir()}
    expected = pydicom.uid.DeflatedExplicitVRLittleEndian if receiver == "deflate" else pydicom.uid.JPEGLSLossless
    assert expected in syntaxes, syntaxes
