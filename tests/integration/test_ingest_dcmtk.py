"""Real senders into the real node: DCMTK dcmsend/storescu push RG1 in 11 transfer syntaxes.

Every instance must arrive in the transfer syntax it was sent in, be spooled bit-identical to the
data set that was sent, be recorded once (a second sender's copy is a duplicate), and decode.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom.dsutils import split_dataset

from tests.support.corpus import CORPUS_STUDY_UID, CorpusFile, rg1_corpus  # noqa: F401 (fixture)
from tests.support.dcmtk import dcmsend, echoscu, storescu
from tests.support.node import NodeProcess

LOSSY = {"j2k_lossy", "jpeg_ls_near_lossless"}


def dataset_bytes(path: Path) -> bytes:
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    running = NodeProcess(tmp_path_factory.mktemp("node"), scp_processes=2, settings={"assembly": {"quiet_period_s": 600, "hard_cap_s": 600}})
    running.add_source("dcmsend", "DCMSEND")
    running.add_source("storescu", "STORESCU")
    running.start()
    yield running
    running.stop()


def wire_bytes(item: CorpusFile) -> bytes:
    """The data set as it goes on the wire: a deflated stream of odd length is padded to even (PS3.5 A.5)."""
    data = dataset_bytes(item.path)
    return data + b"\0" if item.transfer_syntax.is_deflated and len(data) % 2 else data


def spooled_by_uid(node: NodeProcess) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for path in node.spooled_files():
        found.setdefault(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID), []).append(path)
    return found


def test_echo(node: NodeProcess) -> None:
    result = echoscu(node.port, "DCMSEND", "ANATOMIX")
    assert result.returncode == 0, result.stderr


#: storescu's proposal option per corpus variant: the file's own syntax is the one negotiated.
STORESCU_PROPOSAL = {
    "explicit_le": "-xe",
    "implicit_le": "-xi",
    "big_endian": "-xb",
    "deflated": "-xd",
    "jpeg_lossless_sv1": "-xs",
    "jpeg_ls_lossless": "-xt",
    "jpeg_ls_near_lossless": "-xu",
    "rle": "-xr",
    "j2k_lossless": "-xv",
    "j2k_lossy": "-xw",
}


def assert_spooled_as_sent(node: NodeProcess, item: CorpusFile) -> Path:
    """Exactly one spooled file for the instance, in the syntax sent, same data set bytes, pixels decode."""
    spooled = spooled_by_uid(node)
    assert len(spooled.get(item.sop_instance_uid, [])) == 1, f"{item.name}: expected exactly one spooled file"
    path = spooled[item.sop_instance_uid][0]
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == item.transfer_syntax, f"{item.name} arrived as {ds.file_meta.TransferSyntaxUID.name}"
    assert dataset_bytes(path) == wire_bytes(item), f"{item.name}: spooled bytes differ from what was sent"
    reference = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm")).pixel_array
    pixels = ds.pixel_array
    assert pixels.shape == reference.shape
    if item.name not in LOSSY:
        assert np.array_equal(pixels, reference), f"{item.name}: lossless pixels differ from RG1"
    return path


@pytest.mark.parametrize("name", list(STORESCU_PROPOSAL))
def test_storescu_pushes_rg1_bit_identical(node: NodeProcess, rg1_corpus: dict[str, CorpusFile], name: str) -> None:
    item = rg1_corpus[name]
    result = storescu(node.port, [item.path], "STORESCU", "ANATOMIX", STORESCU_PROPOSAL[name])
    assert result.returncode == 0, result.stderr[-2000:]
    assert_spooled_as_sent(node, item)


def test_dcmsend_pushes_the_whole_set_again_as_duplicates(node: NodeProcess, rg1_corpus: dict[str, CorpusFile]) -> None:
    """dcmsend picks a context per file; compressed files go as they are (-dn), the rest it may convert."""
    result = dcmsend(node.port, [c.path for c in rg1_corpus.values()], "DCMSEND", "ANATOMIX", "-dn")
    assert result.returncode == 0, result.stderr[-2000:]
    for item in rg1_corpus.values():
        if item.name == "jpeg_lossless_p14":  # storescu has no proposal for process 14 (non-SV1): first arrival here
            assert_spooled_as_sent(node, item)
    store = node.open_store()
    try:
        instances = store.list_instances(CORPUS_STUDY_UID)
        # dcmsend re-encodes uncompressed files in the syntax it prefers: those arrive as new versions.
        latest = {}
        for instance in instances:
            latest.setdefault(instance.sop_instance_uid, []).append(instance)
        assert sorted(latest) == sorted(c.sop_instance_uid for c in rg1_corpus.values())
        for item in rg1_corpus.values():
            if item.transfer_syntax.is_compressed:
                assert len(latest[item.sop_instance_uid]) == 1, f"{item.name}: compressed bytes resent unchanged must be a duplicate"
        arrived = {i.transfer_syntax_uid for i in instances}
        assert len(arrived) >= 6
        study = store.get_study(CORPUS_STUDY_UID)
        assert study is not None and study.state == "receiving"
    finally:
        store.close()


def test_dcmsend_whole_study_with_a_private_class_object_succeeds(node: NodeProcess, tmp_path: Path) -> None:
    """A study push mixing a chest CR and a vendor-private object (Siemens CSA Non-Image class):
    every instance is acknowledged and stored; the private one is never selected for analysis."""
    from dicom_node.pipeline.selection import select_instance
    from tests.support.corpus import synthetic_cr

    study = "1.2.826.0.1.3680043.8.498.2.8"
    image = synthetic_cr(study, study + ".1.1")
    private = synthetic_cr(study, study + ".1.2", sop_class_uid="1.3.12.2.1107.5.9.1", seed=1)
    private.Modality = "OT"
    paths = []
    for name, ds in (("cr", image), ("private", private)):
        paths.append(tmp_path / f"{name}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    # --no-uid-checks: dcmsend otherwise refuses a SOP class it does not know before sending.
    result = dcmsend(node.port, paths, "DCMSEND", "ANATOMIX", "--no-uid-checks")
    assert result.returncode == 0, result.stderr[-2000:]

    spooled = spooled_by_uid(node)
    for path, ds in zip(paths, (image, private)):
        [stored] = spooled[str(ds.SOPInstanceUID)]
        assert dataset_bytes(stored) == dataset_bytes(path)
    decision = select_instance(pydicom.dcmread(spooled[str(private.SOPInstanceUID)][0]), "2.25.1")
    assert not decision.selected and "not a CR or DX" in decision.reason
    store = node.open_store()
    try:
        classes = sorted(i.sop_class_uid for i in store.list_instances(study))
        assert classes == ["1.2.840.10008.5.1.4.1.1.1", "1.3.12.2.1107.5.9.1"]
    finally:
        store.close()
