"""The SCP in-process against pynetdicom SCUs: acceptance policy, C-ECHO, durable C-STORE, 0xA700.

Real SQLite store, real files, real associations on loopback; the SCP is the same StorageScp the
node's processes run (the subprocess node is exercised in tests/integration and tests/faults).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

from dicom_node.audit.trail import open_audit_trail
from dicom_node.net import negotiation
from dicom_node.net.scp import StorageScp, accept_unlisted_classes_in_this_process, build_ae
from dicom_node.pipeline.assembly import close_studies_at_release
from dicom_node.settings import Settings
from dicom_node.store import open_store
from dicom_node.store.base import RemoteNode, Store
from tests.support.corpus import synthetic_cr
from tests.support.net import free_port


@dataclass
class RunningScp:
    settings: Settings
    store: Store
    port: int
    server: object

    @property
    def spool(self) -> Path:
        return self.settings.storage.spool_dir


def start_scp(tmp_path: Path, **node: object) -> RunningScp:
    port = free_port()
    settings = Settings().with_overrides(node={"port": port, **node}, storage={"data_dir": tmp_path / "var", "min_free_bytes": 0})
    (tmp_path / "var" / "spool" / ".tmp").mkdir(parents=True)
    store = open_store(f"sqlite:///{tmp_path / 'var' / 'anatomix.db'}")
    store.add_remote_node(RemoteNode(name="modality", ae_title="MODALITY", host="127.0.0.1", port=104, role="source", complete_on_release=True))
    trail = open_audit_trail(store, str(tmp_path / "audit.jsonl"))
    scp = StorageScp(settings, store, trail, on_release=lambda src, uids: close_studies_at_release(store, settings, src, uids, trail))
    server = build_ae(settings).start_server(("127.0.0.1", port), block=False, evt_handlers=scp.event_handlers())
    return RunningScp(settings, store, port, server)


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[RunningScp]:
    running = start_scp(tmp_path)
    yield running
    running.server.shutdown()
    running.store.close()


def associate(port: int, calling: str = "MODALITY", called: str = "ANATOMIX"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(ComputedRadiographyImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    return ae.associate("127.0.0.1", port, ae_title=called)


def send_file_bytes(port: int, path: Path, calling: str = "MODALITY") -> int:
    """Send a Part 10 file's data set bytes exactly as stored (pynetdicom chunked mode: no re-encode)."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        meta, _ = split_dataset(path)
        ae = AE(ae_title=calling)
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        assoc = ae.associate("127.0.0.1", port, ae_title="ANATOMIX")
        assert assoc.is_established, "association refused"
        status = assoc.send_c_store(path)
        assoc.release()
        return int(status.Status)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


def dataset_bytes(path: Path) -> bytes:
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def test_echo_from_a_configured_source(scp: RunningScp) -> None:
    assoc = associate(scp.port)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert scp.store.list_audit_events("association_accepted")[0].calling_ae == "MODALITY"
    # The same event went to the append-only JSON-lines audit file.
    lines = [json.loads(line) for line in (scp.settings.storage.data_dir.parent / "audit.jsonl").read_text().splitlines()]
    assert [(e["event"], e["calling_ae"], e["called_ae"]) for e in lines][0] == ("association_accepted", "MODALITY", "ANATOMIX")


@pytest.mark.parametrize(
    ("calling", "called", "diagnostic"),
    [("MODALITY", "NOT_US", 0x07), ("STRANGER", "ANATOMIX", 0x03)],
    ids=["wrong-called-ae", "unknown-calling-ae"],
)
def test_association_rejected_with_the_standard_reason(scp: RunningScp, calling: str, called: str, diagnostic: int) -> None:
    assoc = associate(scp.port, calling=calling, called=called)
    assert assoc.is_rejected
    rejection = assoc.acceptor.primitive
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (0x01, 0x01, diagnostic)
    events = scp.store.list_audit_events("association_rejected")
    assert len(events) == 1
    assert events[0].calling_ae == calling and events[0].called_ae == called
    assert events[0].detail["diagnostic"] == diagnostic


def test_accept_unknown_sources_admits_any_calling_ae(tmp_path: Path) -> None:
    running = start_scp(tmp_path, accept_unknown_sources=True)
    try:
        assoc = associate(running.port, calling="ANYONE")
        assert assoc.is_established
        assoc.release()
    finally:
        running.server.shutdown()
        running.store.close()


def test_store_keeps_the_bytes_as_sent_and_records_once(scp: RunningScp) -> None:
    source = Path(get_testdata_file("RG1_UNCR.dcm"))
    assert send_file_bytes(scp.port, source) == 0x0000
    files = sorted(scp.spool.rglob("*.dcm"))
    assert len(files) == 1
    assert dataset_bytes(files[0]) == dataset_bytes(source)
    spooled = pydicom.dcmread(files[0])
    assert spooled.file_meta.TransferSyntaxUID == pydicom.dcmread(source, stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert spooled.pixel_array.shape == (1955, 1841)

    assert send_file_bytes(scp.port, source) == 0x0000  # the same bytes again: success, nothing new
    assert sorted(scp.spool.rglob("*.dcm")) == files
    study_uid = str(spooled.StudyInstanceUID)
    instances = scp.store.list_instances(study_uid)
    assert len(instances) == 1
    assert instances[0].path == str(files[0].relative_to(scp.spool))
    assert list((scp.spool / ".tmp").iterdir()) == []


def test_same_uid_other_bytes_is_kept_as_a_new_version_and_audited(scp: RunningScp, tmp_path: Path) -> None:
    first = synthetic_cr("1.2.826.0.1.3680043.8.498.7", "1.2.826.0.1.3680043.8.498.7.1", seed=1)
    second = synthetic_cr("1.2.826.0.1.3680043.8.498.7", "1.2.826.0.1.3680043.8.498.7.1", seed=2)
    paths = []
    for index, ds in enumerate((first, second)):
        path = tmp_path / f"v{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        assert send_file_bytes(scp.port, path) == 0x0000
    files = sorted(scp.spool.rglob("*.dcm"))
    assert len(files) == 2
    assert {dataset_bytes(f) for f in files} == {dataset_bytes(p) for p in paths}
    assert len(scp.store.list_instances("1.2.826.0.1.3680043.8.498.7")) == 2
    assert [e.sop_instance_uid for e in scp.store.list_audit_events("instance_new_version")] == ["1.2.826.0.1.3680043.8.498.7.1"]


def test_watermark_answers_out_of_resources_and_leaves_nothing(tmp_path: Path) -> None:
    running = start_scp(tmp_path)
    try:
        # Same SCP, but a watermark above the disk's free space: every store must be refused.
        running_settings = running.settings.with_overrides(storage={"min_free_bytes": 1 << 60})
        running.server.shutdown()
        trail = open_audit_trail(running.store, "")
        scp = StorageScp(running_settings, running.store, trail)
        server = build_ae(running_settings).start_server(("127.0.0.1", running.port), block=False, evt_handlers=scp.event_handlers())
        try:
            status = send_file_bytes(running.port, Path(get_testdata_file("RG1_UNCR.dcm")))
        finally:
            server.shutdown()
        assert status == 0xA700
        assert list(running.spool.rglob("*.dcm")) == []
        assert list((running.spool / ".tmp").iterdir()) == []
        assert running.store.list_studies() == []
    finally:
        running.store.close()


def test_release_closes_the_study_of_a_complete_on_release_source(scp: RunningScp, tmp_path: Path) -> None:
    study_uid = "1.2.826.0.1.3680043.8.498.8"
    frontal, lateral = tmp_path / "pa.dcm", tmp_path / "lat.dcm"
    synthetic_cr(study_uid, study_uid + ".1", seed=3).save_as(frontal, enforce_file_format=True)
    synthetic_cr(study_uid, study_uid + ".2", seed=4, view_position="LL").save_as(lateral, enforce_file_format=True)
    for path in (frontal, lateral):
        assert send_file_bytes(scp.port, path) == 0x0000  # one association each; the second release closes
    # EVT_RELEASED runs in the SCP's association thread right after the release reply: poll briefly.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        study = scp.store.get_study(study_uid)
        if study is not None and study.state == "stable" and all(i.state != "received" for i in scp.store.list_instances(study_uid)):
            break
        time.sleep(0.05)
    assert study is not None and study.state == "stable"
    states = {i.sop_instance_uid: (i.state, i.reason) for i in scp.store.list_instances(study_uid)}
    assert states[study_uid + ".1"][0] == "selected"
    assert states[study_uid + ".2"] == ("skipped", "view position LL is not frontal (PA/AP)")


#: A vendor-private class (Siemens CSA Non-Image) and a public UID pynetdicom has no class for.
PRIVATE_CLASS = "1.3.12.2.1107.5.9.1"
UNKNOWN_PUBLIC_CLASS = "1.2.840.10008.5.1.4.1.1.9999"


@pytest.fixture
def unlisted_negotiation() -> Iterator[None]:
    """What ``serve`` does once in each SCP process (process-wide): undone after the test."""
    accept_unlisted_classes_in_this_process()
    yield
    negotiation.restore()


@pytest.mark.parametrize("sop_class", [PRIVATE_CLASS, UNKNOWN_PUBLIC_CLASS], ids=["private", "unknown-public"])
@pytest.mark.usefixtures("unlisted_negotiation")
def test_unlisted_storage_class_is_accepted_stored_and_recorded(scp: RunningScp, tmp_path: Path, sop_class: str) -> None:
    study = "1.2.826.0.1.3680043.8.498.8"
    ds = synthetic_cr(study, study + ".1.1", sop_class_uid=sop_class)
    ds.Modality = "OT"
    path = tmp_path / "unlisted.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert send_file_bytes(scp.port, path) == 0x0000
    files = sorted(scp.spool.rglob("*.dcm"))
    assert len(files) == 1 and dataset_bytes(files[0]) == dataset_bytes(path)
    [instance] = scp.store.list_instances(study)
    assert instance.sop_class_uid == sop_class


@pytest.mark.usefixtures("unlisted_negotiation")
def test_unlisted_class_in_an_undecodable_syntax_is_refused_per_context(scp: RunningScp) -> None:
    """The private class gets our syntax list, not the sender's first choice (JPEG XL here)."""
    jpeg_xl = "1.2.840.10008.1.2.4.110"
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(PRIVATE_CLASS, [jpeg_xl])
    ae.add_requested_context(PRIVATE_CLASS, [jpeg_xl, "1.2.840.10008.1.2.1"])
    ae.add_requested_context(ComputedRadiographyImageStorage, [jpeg_xl])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="ANATOMIX")
    try:
        assert assoc.is_established
        accepted = [(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts]
        assert accepted == [(PRIVATE_CLASS, "1.2.840.10008.1.2.1")]
        assert sorted(cx.result for cx in assoc.rejected_contexts) == [0x04, 0x04]
    finally:
        assoc.release()


def test_building_the_scp_ae_does_not_patch_pynetdicom(tmp_path: Path) -> None:
    """build_ae leaves pynetdicom's negotiation alone (a fresh process, nothing installed before)."""
    code = (
        "import pynetdicom.acse, pynetdicom.presentation\n"
        "from pynetdicom import _config\n"
        "from dicom_node.net.scp import build_ae\n"
        "from dicom_node.settings import Settings\n"
        "build_ae(Settings())\n"
        "assert pynetdicom.acse.negotiate_unrestricted is pynetdicom.presentation.negotiate_unrestricted\n"
        "assert _config.UNRESTRICTED_STORAGE_SERVICE is False\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stderr[-2000:]


def test_an_scp_ae_without_the_serve_step_refuses_a_private_class(scp: RunningScp) -> None:
    """Nothing installed in this process: the SCP's AE negotiates as plain pynetdicom (no private class)."""
    assert not negotiation.is_installed()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(PRIVATE_CLASS, ["1.2.840.10008.1.2.1"])
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="ANATOMIX")
    try:
        assert assoc.is_established
        assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [Verification]
    finally:
        assoc.release()


def test_installing_the_negotiation_is_idempotent_and_restorable() -> None:
    import pynetdicom.acse
    import pynetdicom.presentation

    original = pynetdicom.acse.negotiate_unrestricted
    try:
        assert accept_unlisted_classes_in_this_process() is True
        assert accept_unlisted_classes_in_this_process() is False  # the second call changes nothing
        assert negotiation.is_installed() and _config.UNRESTRICTED_STORAGE_SERVICE
    finally:
        negotiation.restore()
    # pynetdicom's own hook came back, not ours (a second install must not save ours as "original")
    assert pynetdicom.acse.negotiate_unrestricted is original is pynetdicom.presentation.negotiate_unrestricted
    assert _config.UNRESTRICTED_STORAGE_SERVICE is False
