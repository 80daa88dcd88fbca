"""Malformed C-STORE data sets against the real node (subprocess), while another sender keeps going.

Each damaged data set is sent byte for byte (pynetdicom chunked mode: no parse, no re-encode).
Each must get a proper failure status (0xC000 cannot understand, 0xA900 does not match the SOP
class) with one log line that says why, or, when the bytes are valid DICOM whose pixels cannot be
what the header says, be stored and flagged. Meanwhile DCMTK storescu sends valid instances in a
loop on other associations: every one of them must succeed, and the node must still answer after.
"""

from __future__ import annotations

import random
import struct
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom.dsutils import split_dataset

from tests.support.corpus import encode_dataset, synthetic_cr, write_part10, write_synthetic_set
from tests.support.dcmtk import echoscu, storescu
from tests.support.node import NodeProcess, send_part10_raw

CR = "1.2.840.10008.5.1.4.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
STUDY = "1.2.826.0.1.3680043.8.498.9"
FLAGGED = "stored-and-flagged"


@dataclass(frozen=True)
class Case:
    name: str
    dataset_bytes: bytes
    expected: int | str
    sop_class_uid: str = CR
    transfer_syntax: str = EXPLICIT_LE
    #: The SOP Instance UID the C-STORE request names (the data set's own, unless the case is a mismatch).
    sop_instance_uid: str = ""


def file_dataset_bytes(name: str) -> tuple[pydicom.Dataset, bytes]:
    path = Path(get_testdata_file(name))
    meta, offset = split_dataset(path)
    return meta, path.read_bytes()[offset:]


def valid_cr(index: int, **changes: object) -> pydicom.Dataset:
    ds = synthetic_cr(STUDY, f"{STUDY}.{index}", seed=index)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def element_offset(data: bytes, group: int, element: int) -> int:
    """Offset of a top-level explicit-LE element header in ``data`` (first match of its tag)."""
    offset = data.find(struct.pack("<HH", group, element))
    assert offset >= 0
    return offset


def letters_in_study_uid() -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UI value we mean to send
        return encode_dataset(valid_cr(4, StudyInstanceUID="1.2.abc.4"))


def build_cases() -> list[Case]:
    cases: list[Case] = []
    # pydicom's own damaged files, sent as they are.
    for name, expected in [
        ("MR_truncated.dcm", 0xC000),
        ("rtplan_truncated.dcm", 0xC000),
        ("emri_small_jpeg_2k_lossless_too_short.dcm", 0xC000),
        ("bad_sequence.dcm", 0xC000),  # hex strings where UIDs belong
    ]:
        meta, data = file_dataset_bytes(name)
        cases.append(Case(name, data, expected, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID), str(meta.MediaStorageSOPInstanceUID)))
    meta, data = file_dataset_bytes("badVR.dcm")  # IS "1A": a bad value we do not use; structure is sound
    own_uid = str(pydicom.dcmread(get_testdata_file("badVR.dcm"), stop_before_pixels=True).SOPInstanceUID)
    cases.append(Case("badVR.dcm (bad IS value, stored)", data, 0x0000, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID), own_uid))
    # Its File Meta names another SOP Instance UID than its data set: sent under that one, a mismatch.
    cases.append(
        Case(
            "badVR.dcm under its meta's other UID",
            data,
            0xA900,
            str(meta.MediaStorageSOPClassUID),
            str(meta.TransferSyntaxUID),
            str(meta.MediaStorageSOPInstanceUID),
        )
    )
    no_meta = Path(get_testdata_file("no_meta.dcm")).read_bytes()  # implicit VR bytes, no meta
    cases.append(Case("no_meta.dcm sent as explicit VR", no_meta, 0xC000, CT, EXPLICIT_LE, "1.2.826.0.1.3680043.8.498.9.900"))
    big = Path(get_testdata_file("ExplVR_BigEndNoMeta.dcm")).read_bytes()
    cases.append(Case("big-endian bytes sent as little endian", big, 0xC000, CR, EXPLICIT_LE, "1.2.826.0.1.3680043.8.498.9.901"))
    meta, j2k = file_dataset_bytes("RG1_J2KR.dcm")
    cases.append(Case("J2K without sequence delimiter", j2k[:-8], 0xC000, CR, J2K_LOSSLESS, str(meta.MediaStorageSOPInstanceUID)))
    cases.append(Case("J2K cut inside a fragment", j2k[: len(j2k) // 2], 0xC000, CR, J2K_LOSSLESS, str(meta.MediaStorageSOPInstanceUID)))

    good = encode_dataset(valid_cr(1))
    uid1 = f"{STUDY}.1"
    cases += [
        Case("random bytes", random.Random(1).randbytes(4096), 0xC000, sop_instance_uid="1.2.826.0.1.3680043.8.498.9.902"),
        Case("empty data set", b"", 0xC000, sop_instance_uid="1.2.826.0.1.3680043.8.498.9.903"),
        Case("cut in half", good[: len(good) // 2], 0xC000, sop_instance_uid=uid1),
        Case("cut inside the header", good[:100], 0xC000, sop_instance_uid=uid1),
        Case("last byte missing", good[:-1], 0xC000, sop_instance_uid=uid1),
        Case("garbage appended", good + b"\x01\x02\x03\x04\x05\x06", 0xC000, sop_instance_uid=uid1),
    ]
    # Wrong VRs and impossible lengths in an otherwise good header.
    at = element_offset(good, 0x0008, 0x0018)  # SOP Instance UID
    cases.append(Case("VR bytes zeroed", good[: at + 4] + b"\x00\x00" + good[at + 6 :], 0xC000, sop_instance_uid=uid1))
    at_name = element_offset(good, 0x0010, 0x0010)  # Patient's Name, PN with 2-byte length
    cases.append(Case("text element relabelled SQ", good[: at_name + 4] + b"SQ" + good[at_name + 6 :], 0xC000, sop_instance_uid=uid1))
    at_pixels = element_offset(good, 0x7FE0, 0x0010)
    huge = good[: at_pixels + 8] + struct.pack("<L", 0x7FFFFFF0) + good[at_pixels + 12 :]
    cases.append(Case("pixel length beyond the data", huge, 0xC000, sop_instance_uid=uid1))
    noise = bytearray(good)
    noise[200:264] = random.Random(2).randbytes(64)
    cases.append(Case("random bytes in the header", bytes(noise), 0xC000, sop_instance_uid=uid1))
    # Attributes the node needs.
    cases += [
        Case("no SOP Instance UID", encode_dataset(valid_cr(2, SOPInstanceUID=None)), 0xC000, sop_instance_uid=f"{STUDY}.2"),
        Case("no Study Instance UID", encode_dataset(valid_cr(3, StudyInstanceUID=None)), 0xC000, sop_instance_uid=f"{STUDY}.3"),
        Case("Study UID with letters", letters_in_study_uid(), 0xC000, sop_instance_uid=f"{STUDY}.4"),
        Case("SOP Instance UID differs from the request", encode_dataset(valid_cr(5)), 0xA900, sop_instance_uid=f"{STUDY}.55"),
        Case("SOP Class differs from the request", encode_dataset(valid_cr(6)), 0xA900, sop_class_uid=CT, sop_instance_uid=f"{STUDY}.6"),
        Case("implicit VR bytes under explicit VR", encode_dataset(valid_cr(7), implicit_vr=True), 0xC000, sop_instance_uid=f"{STUDY}.7"),
        Case("deflated syntax, bytes not deflated", encode_dataset(valid_cr(8)), 0xC000, transfer_syntax=DEFLATED, sop_instance_uid=f"{STUDY}.8"),
    ]
    # Valid DICOM whose pixels cannot be what the header says: stored and flagged.
    short_pixels = valid_cr(9)
    short_pixels.PixelData = short_pixels.PixelData[:1000]
    cases.append(Case("pixel data shorter than the geometry", encode_dataset(short_pixels), FLAGGED, sop_instance_uid=f"{STUDY}.9"))
    return cases


CASES = build_cases()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    running = NodeProcess(tmp_path_factory.mktemp("node"), scp_processes=2)
    running.add_source("fuzzer", "FUZZER")
    running.add_source("modality", "STORESCU")
    running.start()
    yield running
    running.stop()


def test_at_least_twenty_malformed_inputs() -> None:
    assert sum(1 for c in CASES if c.expected not in (0x0000,)) >= 20


def test_malformed_inputs_get_proper_statuses_while_another_sender_succeeds(node: NodeProcess, tmp_path: Path) -> None:
    valid_files = write_synthetic_set(tmp_path / "valid", 60, study_uid="1.2.826.0.1.3680043.8.498.10")
    done = threading.Event()
    sender_codes: list[int] = []
    sent_valid: list[Path] = []

    def keep_sending() -> None:
        chunks = [valid_files[i : i + 3] for i in range(0, len(valid_files), 3)]
        for chunk in chunks:
            result = storescu(node.port, chunk, "STORESCU", "ANATOMIX")
            sender_codes.append(result.returncode)
            sent_valid.extend(chunk)
            if done.is_set() and len(sent_valid) >= 9:
                break

    sender = threading.Thread(target=keep_sending)
    sender.start()
    results: dict[str, int | None] = {}
    try:
        for index, case in enumerate(CASES):
            path = write_part10(tmp_path / f"case_{index:02d}.dcm", case.sop_class_uid, case.sop_instance_uid, case.transfer_syntax, case.dataset_bytes)
            results[case.name] = send_part10_raw(node.port, path, "FUZZER")
    finally:
        done.set()
        sender.join(timeout=300)

    wrong = {}
    for case in CASES:
        expected = 0x0000 if case.expected == FLAGGED else case.expected
        if results[case.name] != expected:
            wrong[case.name] = (None if results[case.name] is None else hex(results[case.name]), hex(expected))
    assert not wrong, f"cases with an unexpected status (got, expected): {wrong}"

    # One log line per refused instance, naming it and the reason.
    log = node.log_text()
    for case in CASES:
        if case.expected not in (0x0000, FLAGGED):
            lines = [line for line in log.splitlines() if "refused with 0x" in line and case.sop_instance_uid[:64] in line]
            assert lines, f"{case.name}: no log line says why it was refused"

    # The other sender never noticed.
    assert sender_codes and all(code == 0 for code in sender_codes), sender_codes
    assert echoscu(node.port, "STORESCU", "ANATOMIX").returncode == 0
    store = node.open_store()
    try:
        stored = {i.sop_instance_uid for i in store.list_instances("1.2.826.0.1.3680043.8.498.10")}
        assert stored == {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sent_valid}
        flagged = [i for i in store.list_instances(STUDY) if i.sop_instance_uid == f"{STUDY}.9"]
        assert len(flagged) == 1 and flagged[0].state == "failed" and "pixel data unusable" in (flagged[0].reason or "")
        refused = store.list_audit_events("instance_rejected", limit=100)
        assert len(refused) == sum(1 for c in CASES if c.expected not in (0x0000, FLAGGED))
    finally:
        store.close()
    assert node.temp_files() == []
