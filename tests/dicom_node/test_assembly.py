"""Assembly against the real SQLite store and real spooled files: quiet period (global and per
source), hard cap, late instances, selection recorded per instance, the on_stable hand-off, the loop."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dicom_node.pipeline.assembly import assemble_once, close_stable_studies, run_assembly
from dicom_node.settings import Settings
from dicom_node.store import open_store
from dicom_node.store.base import InstanceRecord, RemoteNode, Store
from dicom_node.store.spool import prepare_spool, write_instance
from tests.support.corpus import synthetic_cr

STUDY = "1.2.826.0.1.3680043.8.498.30"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = Settings().with_overrides(storage={"data_dir": tmp_path / "var"}, assembly={"quiet_period_s": 10.0, "hard_cap_s": 60.0, "poll_interval_s": 0.05})
    prepare_spool(settings.storage.spool_dir)
    return settings


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    yield opened
    opened.close()


def receive(store: Store, settings: Settings, study: str, number: int, calling_ae: str = "MODALITY", **changes: str) -> InstanceRecord:
    """Spool and record one synthetic instance, as the SCP would."""
    ds = synthetic_cr(study, f"{study}.{number}", seed=number)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    spooled = write_instance(settings.storage.spool_dir, study, ds.SOPInstanceUID, [buffer.getvalue()], fsync=False)
    record = InstanceRecord(
        sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        study_instance_uid=study,
        series_instance_uid=ds.SeriesInstanceUID,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
        path=spooled.relative_path,
        size=spooled.size,
        sha256=spooled.sha256,
        calling_ae=calling_ae,
        received_at=datetime.now(UTC),
    )
    return store.record_instance(record).instance


def later(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def test_quiet_period_closes_and_records_selection(store: Store, settings: Settings) -> None:
    receive(store, settings, STUDY, 1)
    receive(store, settings, STUDY, 2, ViewPosition="LL")
    receive(store, settings, STUDY, 3, BodyPartExamined="HAND")
    assert close_stable_studies(store, settings, later(5)) == []  # still inside the quiet period
    assert close_stable_studies(store, settings, later(11)) == [(STUDY, 1)]
    assert store.get_study(STUDY).state == "stable"
    states = {i.sop_instance_uid: (i.state, i.reason) for i in store.list_instances(STUDY)}
    assert states == {
        f"{STUDY}.1": ("selected", "CR chest PA"),
        f"{STUDY}.2": ("skipped", "view position LL is not frontal (PA/AP)"),
        f"{STUDY}.3": ("skipped", "body part HAND is not chest"),
    }


def test_per_source_quiet_period_and_hard_cap(store: Store, settings: Settings) -> None:
    store.add_remote_node(RemoteNode(name="slow", ae_title="SLOWPACS", host="*", port=104, role="source", quiet_period_s=30.0))
    receive(store, settings, STUDY, 1, calling_ae="SLOWPACS")
    assert close_stable_studies(store, settings, later(11)) == []  # the source's own 30 s applies
    assert close_stable_studies(store, settings, later(31)) == [(STUDY, 1)]

    other = STUDY + ".9"
    store.add_remote_node(RemoteNode(name="chatty", ae_title="CHATTY", host="*", port=104, role="source", quiet_period_s=1000.0))
    receive(store, settings, other, 1, calling_ae="CHATTY")
    closed = close_stable_studies(store, settings, later(61))  # past the 60 s hard cap, long before 1000 s quiet
    assert closed == [(other, 1)]


def test_late_instance_reopens_and_only_it_is_selected_next_time(store: Store, settings: Settings) -> None:
    receive(store, settings, STUDY, 1)
    close_stable_studies(store, settings, later(11))
    late = receive(store, settings, STUDY, 2)
    assert store.get_study(STUDY).state == "receiving" and late.state == "received"
    assert close_stable_studies(store, settings, later(11)) == [(STUDY, 1)]
    assert [i.state for i in store.list_instances(STUDY)] == ["selected", "selected"]


def test_missing_spooled_file_is_marked_failed(store: Store, settings: Settings) -> None:
    record = receive(store, settings, STUDY, 1)
    (settings.storage.spool_dir / record.path).unlink()
    close_stable_studies(store, settings, later(11))
    instance = store.list_instances(STUDY)[0]
    assert instance.state == "failed" and "missing" in (instance.reason or "")


def test_assemble_once_hands_stable_studies_to_on_stable(store: Store, settings: Settings) -> None:
    receive(store, settings, STUDY, 1)
    handed: list[tuple[str, int]] = []

    def queue_analysis(study_uid: str, version: int) -> None:
        handed.append((study_uid, version))
        assert store.transition_study(study_uid, version, ("stable",), "queued")

    assemble_once(store, settings, on_stable=queue_analysis, now=later(11))
    assemble_once(store, settings, on_stable=queue_analysis, now=later(12))  # already queued: not offered again
    assert handed == [(STUDY, 1)]
    assert store.get_study(STUDY).state == "queued"


def test_run_assembly_loop_closes_a_study_and_stops(store: Store, settings: Settings) -> None:
    fast = settings.with_overrides(assembly={"quiet_period_s": 0.2, "hard_cap_s": 60.0})
    receive(store, fast, STUDY, 1)
    stop = threading.Event()
    handed: list[tuple[str, int]] = []
    loop = threading.Thread(
        target=run_assembly,
        args=(store, fast, stop),
        kwargs={"on_stable": lambda uid, version: (handed.append((uid, version)), store.transition_study(uid, version, ("stable",), "queued"))},
    )
    loop.start()
    deadline = time.monotonic() + 10
    while not handed and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    loop.join(timeout=5)
    assert not loop.is_alive()
    assert handed == [(STUDY, 1)]
