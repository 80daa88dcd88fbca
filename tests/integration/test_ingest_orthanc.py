"""Orthanc as the PACS pushes RG1 in several transfer syntaxes to the node (REST upload, then
``POST /modalities/node/store``). Orthanc transcodes silently when a syntax is refused, so the test
asserts the syntax that actually arrived, the bytes, the single DB row and decodable pixels."""

from __future__ import annotations

from collections.abc import Iterator

import pydicom
import pytest
from pynetdicom.dsutils import split_dataset

from tests.support.corpus import CORPUS_STUDY_UID, CorpusFile, rg1_corpus  # noqa: F401 (fixture)
from tests.support.node import NodeProcess
from tests.support.orthanc import Orthanc

PUSHED = ("explicit_le", "implicit_le", "big_endian", "jpeg_lossless_sv1", "jpeg_ls_lossless", "rle", "j2k_lossless", "j2k_lossy")


@pytest.fixture(scope="module")
def node_and_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, Orthanc]]:
    node = NodeProcess(tmp_path_factory.mktemp("node"), settings={"assembly": {"quiet_period_s": 600, "hard_cap_s": 600}})
    node.add_source("pacs", "ORTHANC")
    node.start()
    orthanc = Orthanc(tmp_path_factory.mktemp("orthanc"), modalities={"node": ("ANATOMIX", node.port)})
    try:
        orthanc.start()
        yield node, orthanc
    finally:
        orthanc.stop()
        node.stop()


def test_orthanc_echo_reaches_the_node(node_and_orthanc: tuple[NodeProcess, Orthanc]) -> None:
    _, orthanc = node_and_orthanc
    orthanc.post("/modalities/node/echo", {})  # raises HTTPError unless the C-ECHO succeeded


def test_orthanc_push_arrives_in_the_syntax_stored_bit_identical(node_and_orthanc: tuple[NodeProcess, Orthanc], rg1_corpus: dict[str, CorpusFile]) -> None:
    node, orthanc = node_and_orthanc
    for name in PUSHED:
        item = rg1_corpus[name]
        uploaded = orthanc.upload(item.path)
        reply = orthanc.post("/modalities/node/store", {"Resources": [uploaded["ID"]], "Synchronous": True})
        assert reply.get("FailedInstancesCount", 0) == 0, f"{name}: {reply}"
        # What Orthanc holds is what it sent (it transcodes only when the syntax is refused).
        sent = orthanc.request("GET", f"/instances/{uploaded['ID']}/file")
        offset = split_dataset_bytes(sent)
        spooled = [p for p in node.spooled_files() if item.sop_instance_uid in p.name]
        assert len(spooled) == 1, f"{name}: {len(spooled)} spooled files"
        ds = pydicom.dcmread(spooled[0])
        assert ds.file_meta.TransferSyntaxUID == item.transfer_syntax, f"{name} arrived as {ds.file_meta.TransferSyntaxUID.name}"
        _, spool_offset = split_dataset(spooled[0])
        received = spooled[0].read_bytes()[spool_offset:]
        expected = sent[offset:]
        if len(expected) % 2:
            expected += b"\0"  # PDVs carry even lengths
        assert received == expected, f"{name}: spooled bytes differ from what Orthanc sent"
        assert ds.pixel_array.shape == (1955, 1841)
    store = node.open_store()
    try:
        instances = store.list_instances(CORPUS_STUDY_UID)
        assert sorted(i.sop_instance_uid for i in instances) == sorted(rg1_corpus[n].sop_instance_uid for n in PUSHED)
        assert len({i.transfer_syntax_uid for i in instances}) >= 6
    finally:
        store.close()


def test_orthanc_repush_of_the_study_is_recorded_once(node_and_orthanc: tuple[NodeProcess, Orthanc]) -> None:
    node, orthanc = node_and_orthanc
    studies = orthanc.get("/studies")
    assert len(studies) == 1
    reply = orthanc.post("/modalities/node/store", {"Resources": studies, "Synchronous": True})
    assert reply.get("FailedInstancesCount", 0) == 0
    store = node.open_store()
    try:
        assert len(store.list_instances(CORPUS_STUDY_UID)) == len(PUSHED)
        assert len(node.spooled_files()) == len(PUSHED)
    finally:
        store.close()


def split_dataset_bytes(data: bytes) -> int:
    """Offset of the data set in a Part 10 byte string (after preamble, DICM and the meta group)."""
    assert data[128:132] == b"DICM"
    group_length = int.from_bytes(data[140:144], "little")  # (0002,0000) UL value
    return 144 + group_length
