"""HTJ2K into the real node: RG1 encoded by OpenJPH's ``ojph_compress`` (an independent encoder).

DCMTK 3.6.7 and Orthanc here do not know the HTJ2K transfer syntaxes, so the bytes go on the wire
through pynetdicom exactly as the file holds them (chunked send: no parse, no re-encode). The node
must negotiate each HTJ2K syntax, spool the data set bit-identical, record it once, and decode it:
lossless gives RG1's pixels back exactly, lossy stays close to them.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import HTJ2K, UID, HTJ2KLossless, HTJ2KLosslessRPCL
from pynetdicom.dsutils import split_dataset

from tests.support.node import NodeProcess, send_part10_raw

STUDY_UID = "1.2.826.0.1.3680043.8.498.2.7"

#: name -> (transfer syntax, ojph_compress options). The RPCL syntax also asks for TLM markers,
#: which OpenJPH 0.9 (Debian 12) cannot write; the node neither needs nor checks them.
VARIANTS: dict[str, tuple[UID, tuple[str, ...]]] = {
    "htj2k_lossless": (HTJ2KLossless, ("-reversible", "true", "-prog_order", "LRCP")),
    "htj2k_lossless_rpcl": (HTJ2KLosslessRPCL, ("-reversible", "true", "-prog_order", "RPCL")),
    "htj2k_lossy": (HTJ2K, ("-reversible", "false", "-qstep", "0.001")),
}


def reference() -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))


def write_pgm(pixels: np.ndarray, bits_stored: int, path: Path) -> None:
    """Binary PGM: 16-bit samples are big-endian; maxval carries the bit depth to ojph."""
    header = f"P5\n{pixels.shape[1]} {pixels.shape[0]}\n{(1 << bits_stored) - 1}\n".encode("ascii")
    path.write_bytes(header + pixels.astype(">u2").tobytes())


def encode_htj2k(directory: Path, name: str, index: int) -> tuple[Path, UID, str]:
    syntax, options = VARIANTS[name]
    ds = reference()
    pgm = directory / f"{name}.pgm"
    codestream = directory / f"{name}.j2c"
    write_pgm(ds.pixel_array, int(ds.BitsStored), pgm)
    result = subprocess.run(["ojph_compress", "-i", str(pgm), "-o", str(codestream), *options], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"ojph_compress failed: {result.stdout[-1000:]} {result.stderr[-1000:]}"
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = STUDY_UID + ".1"
    ds.SOPInstanceUID = f"{STUDY_UID}.1.{index}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([codestream.read_bytes()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    if syntax == HTJ2K:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_15444_15"
    if (0xFFFC, 0xFFFC) in ds:
        del ds[0xFFFC, 0xFFFC]
    path = directory / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, syntax, str(ds.SOPInstanceUID)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    running = NodeProcess(tmp_path_factory.mktemp("node"), settings={"assembly": {"quiet_period_s": 600, "hard_cap_s": 600}})
    running.add_source("sender", "HTJ2KSCU")
    running.start()
    yield running
    running.stop()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_htj2k_from_openjph_is_spooled_bit_identical_and_decodes(node: NodeProcess, tmp_path: Path, name: str) -> None:
    path, syntax, sop_uid = encode_htj2k(tmp_path, name, list(VARIANTS).index(name) + 1)
    sent = path.read_bytes()[split_dataset(path)[1] :]
    assert send_part10_raw(node.port, path, "HTJ2KSCU") == 0x0000, node.log_text()[-2000:]

    spooled = [p for p in node.spooled_files() if str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) == sop_uid]
    assert len(spooled) == 1, f"{name}: expected exactly one spooled file, found {len(spooled)}"
    ds = pydicom.dcmread(spooled[0])
    assert ds.file_meta.TransferSyntaxUID == syntax, f"{name} arrived as {ds.file_meta.TransferSyntaxUID.name}"
    assert spooled[0].read_bytes()[split_dataset(spooled[0])[1] :] == sent, f"{name}: spooled bytes differ from what was sent"

    pixels = ds.pixel_array.astype(np.int32)
    original = reference().pixel_array.astype(np.int32)
    assert pixels.shape == original.shape
    if syntax != HTJ2K:
        assert np.array_equal(pixels, original), f"{name}: lossless HTJ2K did not give RG1's pixels back"
    else:
        error = np.abs(pixels - original)
        assert 0 < error.mean() < 0.01 * original.max(), f"{name}: lossy error {error.mean():.1f} out of range"

    store = node.open_store()
    try:
        recorded = [i for i in store.list_instances(STUDY_UID) if i.sop_instance_uid == sop_uid]
        assert [i.transfer_syntax_uid for i in recorded] == [str(syntax)]
    finally:
        store.close()
