"""Delivery: C-STORE SCU against real peers (pynetdicom SCPs in-process, Orthanc), status taxonomy,
88.34 -> 88.33 fallback, retries with backoff, dead letters, exactly one copy in the PACS."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.status import code_to_category

from dicom_node.pipeline.delivery import (
    COMPREHENSIVE_3D_SR,
    COMPREHENSIVE_SR,
    SOP_CLASS_NOT_SUPPORTED,
    OutgoingObject,
    backoff_delay,
    classify_status,
    deliver_study_version,
    send_objects,
)
from dicom_node.settings import DeliverySettings, Settings
from dicom_node.store import open_store
from dicom_node.store.base import InstanceRecord, ProducedObject, RemoteNode
from tests.support.net import free_port
from tests.support.orthanc import Orthanc

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def make_sr(path: Path, sop_class: str, study_uid: str | None = None) -> OutgoingObject:
    """A small but valid SR instance of the given SOP class, written as a Part 10 file."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "DELIVERY-TEST"
    ds.PatientName = "Test^Delivery"
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return OutgoingObject(ds.SOPInstanceUID, sop_class, "sr" if sop_class != BASIC_TEXT_SR else "text_sr", path)


def to_comprehensive(ds: Dataset) -> Dataset:
    """Stand-in for sr_writer's fallback in tests that do not build a TID 1500 SR: same UID, 88.33."""
    ds.SOPClassUID = COMPREHENSIVE_SR
    ds.file_meta.MediaStorageSOPClassUID = COMPREHENSIVE_SR
    return ds


class Receiver:
    """A pynetdicom Storage SCP on a free port that answers ``status`` and keeps what it received."""

    def __init__(self, sop_classes: tuple[str, ...], status: int = 0x0000, ae_title: str = "RECEIVER", require_calling_aet: list[str] | None = None):
        self.port = free_port()
        self.status = status
        self.received: list[Dataset] = []
        ae = AE(ae_title=ae_title)
        for sop_class in sop_classes:
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, "1.2.840.10008.1.2"])
        if require_calling_aet:
            ae.require_calling_aet = require_calling_aet
        self.node = RemoteNode("receiver", ae_title, "127.0.0.1", self.port, role="destination", profile="sr-only")
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event: evt.Event) -> int:
        if self.status == 0x0000 or code_to_category(self.status) == "Warning":  # stored, with or without a warning
            self.received.append(event.dataset)
        return self.status

    def stop(self) -> None:
        self.server.shutdown()


def test_status_taxonomy_and_backoff():
    assert classify_status(0x0000) == "sent"
    assert classify_status(0xB000) == "sent"
    assert classify_status(0xA700) == "transient"
    assert classify_status(0xA7FF) == "transient"
    assert classify_status(0xA900) == "permanent"
    assert classify_status(0xC000) == "permanent"
    assert classify_status(0x0122) == "permanent"
    policy = DeliverySettings(backoff_base_s=2.0, backoff_max_s=30.0)
    rng = random.Random(1)
    for attempt, step in ((1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0), (5, 30.0), (9, 30.0)):
        delays = [backoff_delay(attempt, policy, rng) for _ in range(50)]
        assert all(step / 2 <= d <= step for d in delays), (attempt, min(delays), max(delays))
        assert max(delays) - min(delays) > 0  # jitter


def test_sr_falls_back_to_comprehensive_when_3d_is_not_accepted(tmp_path):
    receiver = Receiver((COMPREHENSIVE_SR, BASIC_TEXT_SR))
    try:
        sr = make_sr(tmp_path / "sr.dcm", COMPREHENSIVE_3D_SR)
        text = make_sr(tmp_path / "text.dcm", BASIC_TEXT_SR)
        outcomes = send_objects(receiver.node, [text, sr], calling_ae="ANATOMIX", timeout_s=10, fallback=to_comprehensive)
    finally:
        receiver.stop()
    assert [o.outcome for o in outcomes] == ["sent", "sent"]
    assert outcomes[0].sop_instance_uid == sr.sop_instance_uid  # SR goes first
    assert outcomes[0].sent_sop_class_uid == COMPREHENSIVE_SR
    got = {str(ds.SOPInstanceUID): str(ds.SOPClassUID) for ds in receiver.received}
    assert got == {sr.sop_instance_uid: COMPREHENSIVE_SR, text.sop_instance_uid: BASIC_TEXT_SR}


@pytest.mark.parametrize(("status", "expected"), [(0xA700, "transient"), (0xA900, "permanent"), (0xC123, "permanent"), (0xB000, "sent")])
def test_dimse_status_is_classified(tmp_path, status, expected):
    receiver = Receiver((BASIC_TEXT_SR,), status=status)
    try:
        text = make_sr(tmp_path / "text.dcm", BASIC_TEXT_SR)
        [outcome] = send_objects(receiver.node, [text], calling_ae="ANATOMIX", timeout_s=10, fallback=to_comprehensive)
    finally:
        receiver.stop()
    assert outcome.outcome == expected
    assert outcome.status == status


@pytest.mark.parametrize("warning", [0x0107, 0x0116, 0xB000, 0xB007, 0xB006])
def test_every_storage_warning_counts_as_stored(tmp_path, warning):
    """A peer that stored the object with any Storage warning has it: "sent", not a failure (issue 15 bug 1)."""
    receiver = Receiver((BASIC_TEXT_SR,), status=warning)
    try:
        text = make_sr(tmp_path / "text.dcm", BASIC_TEXT_SR)
        [outcome] = send_objects(receiver.node, [text], calling_ae="ANATOMIX", timeout_s=10, fallback=to_comprehensive)
    finally:
        receiver.stop()
    assert [str(ds.SOPInstanceUID) for ds in receiver.received] == [text.sop_instance_uid]  # the peer really kept it
    assert (outcome.outcome, outcome.status, outcome.error) == ("sent", warning, None)
    assert classify_status(warning) == "sent"


def test_no_listener_is_transient_and_refused_ae_is_permanent(tmp_path):
    text = make_sr(tmp_path / "text.dcm", BASIC_TEXT_SR)
    nobody = RemoteNode("nobody", "NOBODY", "127.0.0.1", free_port(), role="destination")
    [outcome] = send_objects(nobody, [text], calling_ae="ANATOMIX", timeout_s=5, fallback=to_comprehensive)
    assert outcome.outcome == "transient" and outcome.status is None
    assert "no association" in outcome.error

    receiver = Receiver((BASIC_TEXT_SR,), require_calling_aet=["SOMEONE_ELSE"])
    try:
        [outcome] = send_objects(receiver.node, [text], calling_ae="ANATOMIX", timeout_s=5, fallback=to_comprehensive)
    finally:
        receiver.stop()
    assert outcome.outcome == "permanent"
    assert "rejected (permanent)" in outcome.error and "Calling AE title not recognised" in outcome.error


# ---- deliver_study_version with a real store and a real Orthanc ------------------------------------


def seed_study(store, settings: Settings, study_uid: str, count: int) -> list[OutgoingObject]:
    """A stored study in state delivering with ``count`` produced SR objects on disk."""
    now = datetime.now(UTC)
    store.record_instance(
        InstanceRecord(generate_uid(), "1.2.840.10008.5.1.4.1.1.1", study_uid, generate_uid(), ExplicitVRLittleEndian,
                       "x.dcm", 1, "0" * 64, "MODALITY", now)
    )  # fmt: skip
    for state in ("stable", "queued", "analyzing", "analyzed", "delivering"):
        previous = store.get_study(study_uid).state
        assert store.transition_study(study_uid, 1, (previous,), state)
    objects = []
    for i in range(count):
        obj = make_sr(settings.storage.results_dir / study_uid / "v1" / f"text_sr-{i}.dcm", BASIC_TEXT_SR, study_uid)
        store.record_produced_object(
            ProducedObject(study_uid, 1, "1.2.3", "text_sr", obj.sop_instance_uid, obj.sop_class_uid,
                           str(obj.path.relative_to(settings.storage.results_dir)), now)
        )  # fmt: skip
        objects.append(obj)
    return objects


def test_destination_down_then_back_retries_and_stores_one_copy(tmp_path):
    settings = Settings().with_overrides(storage={"data_dir": tmp_path / "data"}, delivery={"max_attempts": 5, "backoff_base_s": 0.1, "backoff_max_s": 0.5})
    store = open_store(settings.database_url)
    orthanc = Orthanc(tmp_path / "orthanc")
    node = RemoteNode("pacs", orthanc.aet, "127.0.0.1", orthanc.dicom_port, role="both", profile="sr-only", default_destination=True)
    store.add_remote_node(node)
    study_uid = generate_uid()
    objects = seed_study(store, settings, study_uid, 2)
    study = store.get_study(study_uid)
    try:
        first = deliver_study_version(store, settings, study, fallback=to_comprehensive)  # Orthanc not started yet
        assert not first.finished and first.retrying == 2 and first.sent == 0
        records = store.list_deliveries(study_uid)
        assert {r.status for r in records} == {"retrying"} and {r.attempts for r in records} == {1}
        orthanc.start()
        second = deliver_study_version(store, settings, study, fallback=to_comprehensive)
        assert second.finished and second.sent == 2 and not second.errors
        third = deliver_study_version(store, settings, study, fallback=to_comprehensive)  # nothing owed any more
        assert third.sent == 2
        again = deliver_study_version(store, settings, study, fallback=to_comprehensive, resend=True)  # admin resend: same UIDs
        assert again.sent == 2
        stored = orthanc.get("/instances")
        assert len(stored) == 2
        uids = {orthanc.instance_tags(i)["SOPInstanceUID"] for i in stored}
        assert uids == {o.sop_instance_uid for o in objects}
        records = {r.sop_instance_uid: r for r in store.list_deliveries(study_uid)}
        assert all(r.status == "sent" and r.last_status == 0 for r in records.values())
    finally:
        orthanc.stop()
        store.close()


def test_retry_budget_exhausted_is_dead_lettered(tmp_path):
    settings = Settings().with_overrides(storage={"data_dir": tmp_path / "data"}, delivery={"max_attempts": 2, "backoff_base_s": 0.1, "backoff_max_s": 0.2})
    store = open_store(settings.database_url)
    store.add_remote_node(RemoteNode("gone", "GONE", "127.0.0.1", free_port(), role="destination", profile="sr-only", default_destination=True))
    study_uid = generate_uid()
    seed_study(store, settings, study_uid, 1)
    study = store.get_study(study_uid)
    try:
        assert not deliver_study_version(store, settings, study, fallback=to_comprehensive).finished
        [pending] = store.list_deliveries(study_uid)
        last = deliver_study_version(store, settings, study, fallback=to_comprehensive, now=pending.next_attempt_at)
        assert last.finished and last.dead == 1
        [record] = store.list_deliveries(study_uid, statuses=("dead",))
        assert record.attempts == 2 and "dead-lettered after 2 attempts in" in record.error and "no association" in record.error
        assert record.next_attempt_at is None and record.first_attempt_at == pending.first_attempt_at
    finally:
        store.close()


def test_real_bundle_reaches_a_pacs_that_only_knows_comprehensive_sr(tmp_path):
    """sr_writer's TID 1500 SR goes as 88.33 (same UID) to a destination without 88.34; the rest as built."""
    from dicom_node.pipeline.analysis import write_result_objects
    from sr_writer.bundle import comprehensive_sr_fallback
    from tests.support.results import make_result, rg1_source

    source = rg1_source()
    written = write_result_objects(source, make_result(source), ("sr", "text_sr", "gsps"), Settings(), 1, tmp_path / "out")
    receiver = Receiver((COMPREHENSIVE_SR, BASIC_TEXT_SR, "1.2.840.10008.5.1.4.1.1.11.1"))
    try:
        objects = [OutgoingObject(w.sop_instance_uid, w.sop_class_uid, w.kind, w.path) for w in written]
        outcomes = send_objects(receiver.node, objects, calling_ae="ANATOMIX", timeout_s=10, fallback=comprehensive_sr_fallback)
    finally:
        receiver.stop()
    assert [o.outcome for o in outcomes] == ["sent"] * 3
    got = {str(ds.SOPInstanceUID): str(ds.SOPClassUID) for ds in receiver.received}
    sr = next(w for w in written if w.kind == "sr")
    assert got[sr.sop_instance_uid] == COMPREHENSIVE_SR
    assert set(got) == {w.sop_instance_uid for w in written}


# ---- a destination that refuses a SOP class: permanent at once, fallback where one exists (issue 14 item 5)


def seed_objects(store, settings: Settings, study_uid: str, sop_classes: list[str]) -> list[OutgoingObject]:
    """A study in state delivering whose produced objects are one SR-family instance per SOP class given."""
    seed_study(store, settings, study_uid, 0)
    now = datetime.now(UTC)
    objects = []
    for i, sop_class in enumerate(sop_classes):
        obj = make_sr(settings.storage.results_dir / study_uid / "v1" / f"obj-{i}.dcm", sop_class, study_uid)
        store.record_produced_object(
            ProducedObject(study_uid, 1, "1.2.3", obj.kind, obj.sop_instance_uid, obj.sop_class_uid,
                           str(obj.path.relative_to(settings.storage.results_dir)), now)
        )  # fmt: skip
        objects.append(obj)
    return objects


def refusal_settings(tmp_path: Path) -> Settings:
    # A generous retry budget: a refusal treated as transient would be retried, never finish here.
    return Settings().with_overrides(storage={"data_dir": tmp_path / "data"},
                                     delivery={"max_attempts": 50, "backoff_base_s": 0.1, "backoff_max_s": 0.2})  # fmt: skip


def test_destination_without_the_sr_classes_fails_the_sr_at_once_and_gets_the_rest(tmp_path):
    """Accepts Basic Text SR only: the 88.34 SR (no 88.33 either) fails on the first attempt, is never
    retried, and the text SR is delivered in the same pass."""
    settings = refusal_settings(tmp_path)
    store = open_store(settings.database_url)
    receiver = Receiver((BASIC_TEXT_SR,), ae_title="TEXTONLY")
    store.add_remote_node(replace(receiver.node, default_destination=True))
    study_uid = generate_uid()
    sr, text = seed_objects(store, settings, study_uid, [COMPREHENSIVE_3D_SR, BASIC_TEXT_SR])
    try:
        study = store.get_study(study_uid)
        first = deliver_study_version(store, settings, study, fallback=to_comprehensive)
        assert first.finished and first.next_attempt_in is None  # nothing left to retry
        assert (first.sent, first.failed, first.retrying, first.dead) == (1, 1, 0, 0)
        records = {r.sop_instance_uid: r for r in store.list_deliveries(study_uid)}
        assert records[text.sop_instance_uid].status == "sent"
        assert records[sr.sop_instance_uid].status == "failed" and records[sr.sop_instance_uid].attempts == 1
        assert COMPREHENSIVE_3D_SR in records[sr.sop_instance_uid].error
        again = deliver_study_version(store, settings, study, fallback=to_comprehensive)  # a redelivered task
        assert again.finished and store.list_deliveries(study_uid, statuses=("failed",))[0].attempts == 1
        assert [str(ds.SOPInstanceUID) for ds in receiver.received] == [text.sop_instance_uid]  # sent once, SR never
    finally:
        receiver.stop()
        store.close()


def test_destination_accepting_none_of_our_classes_is_permanent_at_once(tmp_path):
    settings = refusal_settings(tmp_path)
    store = open_store(settings.database_url)
    receiver = Receiver(("1.2.840.10008.5.1.4.1.1.7",), ae_title="SCONLY")  # Secondary Capture only
    store.add_remote_node(replace(receiver.node, default_destination=True))
    study_uid = generate_uid()
    seed_objects(store, settings, study_uid, [COMPREHENSIVE_3D_SR, BASIC_TEXT_SR])
    try:
        summary = deliver_study_version(store, settings, store.get_study(study_uid), fallback=to_comprehensive)
        assert summary.finished and (summary.sent, summary.failed, summary.retrying) == (0, 2, 0)
        records = store.list_deliveries(study_uid)
        assert {(r.status, r.attempts) for r in records} == {("failed", 1)}
        assert all("accepted none of the SOP classes" in r.error for r in records)
        assert receiver.received == []
    finally:
        receiver.stop()
        store.close()


class RefusesThreeD(Receiver):
    """Negotiates 88.34 and 88.33 but answers 0x0122 (SOP class not supported) to a 88.34 C-STORE."""

    def _on_store(self, event: evt.Event) -> int:
        if str(event.dataset.SOPClassUID) == COMPREHENSIVE_3D_SR:
            return SOP_CLASS_NOT_SUPPORTED
        self.received.append(event.dataset)
        return 0x0000


def test_status_0122_falls_back_to_comprehensive_sr_on_the_same_association(tmp_path):
    receiver = RefusesThreeD((COMPREHENSIVE_3D_SR, COMPREHENSIVE_SR))
    try:
        sr = make_sr(tmp_path / "sr.dcm", COMPREHENSIVE_3D_SR)
        [outcome] = send_objects(receiver.node, [sr], calling_ae="ANATOMIX", timeout_s=10, fallback=to_comprehensive)
    finally:
        receiver.stop()
    assert (outcome.outcome, outcome.status, outcome.sent_sop_class_uid) == ("sent", 0, COMPREHENSIVE_SR)
    assert [(str(ds.SOPInstanceUID), str(ds.SOPClassUID)) for ds in receiver.received] == [(sr.sop_instance_uid, COMPREHENSIVE_SR)]


@pytest.mark.parametrize("status", [SOP_CLASS_NOT_SUPPORTED, 0xA900, 0xA9FF])
def test_refusal_status_without_a_fallback_fails_at_once(tmp_path, status):
    settings = refusal_settings(tmp_path)
    store = open_store(settings.database_url)
    receiver = Receiver((BASIC_TEXT_SR,), status=status, ae_title="REFUSER")
    store.add_remote_node(replace(receiver.node, default_destination=True))
    study_uid = generate_uid()
    seed_objects(store, settings, study_uid, [BASIC_TEXT_SR])
    try:
        summary = deliver_study_version(store, settings, store.get_study(study_uid), fallback=to_comprehensive)
        assert summary.finished and (summary.failed, summary.retrying) == (1, 0)
        [record] = store.list_deliveries(study_uid)
        assert (record.status, record.attempts, record.last_status) == ("failed", 1, status)
    finally:
        receiver.stop()
        store.close()


class AbortsOnSecond(Receiver):
    """Stores the first object, then aborts the association at the second C-STORE (a PACS restarting)."""

    def _on_store(self, event: evt.Event) -> int:
        if self.received:
            event.assoc.abort()
            return 0xA700  # never reaches the requestor: the association is gone
        self.received.append(event.dataset)
        return 0x0000


def test_abort_mid_association_sends_the_rest_again_later(tmp_path):
    receiver = AbortsOnSecond((BASIC_TEXT_SR,))
    try:
        objects = [make_sr(tmp_path / f"text-{i}.dcm", BASIC_TEXT_SR) for i in range(3)]
        # Whether the requestor sees the A-ABORT or times out waiting, the rest is worth another try.
        outcomes = send_objects(receiver.node, objects, calling_ae="ANATOMIX", timeout_s=5, fallback=to_comprehensive)
    finally:
        receiver.stop()
    assert [o.outcome for o in outcomes] == ["sent", "transient", "transient"]
    assert [str(ds.SOPInstanceUID) for ds in receiver.received] == [objects[0].sop_instance_uid]
