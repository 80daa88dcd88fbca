"""Retention against the real node, its spool and its state store (SQLite), plus the purge command.

- ``serve`` with ``storage.retention_days`` purges a finished study at start-up: spooled files,
  result files and rows go, a ``purged`` tombstone and an audit event stay, other studies are
  untouched, and a late re-send reopens the study as a new version.
- The one interleaving where a purge could remove a file that a new row points to (an exact
  duplicate re-sent while its study is purged) is replayed with the SCP's own functions, in the
  SCP's order: the file is written again before Success.
- ``anatomix-node purge``: dry run, real run, and the one-line refusal when retention is off.
- The policy states, set up explicitly on SQLite and PostgreSQL: one old study in every state;
  ``retention_states = [done]`` purges the done one only (failed and work in progress stay, files
  and rows), ``[done, failed]`` adds the failed one.
- Fault paths: a file that cannot be removed fails the pass with the study untouched in the store
  (no tombstone, no audit) and the next pass completes it; nothing is left for the start-up
  reconciliation to bring back.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest

from dicom_node.audit.trail import open_audit_trail
from dicom_node.pipeline.reconcile import reconcile_spool
from dicom_node.pipeline.retention import purge_expired
from dicom_node.settings import Settings
from dicom_node.store import open_store
from dicom_node.store.base import STUDY_STATES, InstanceRecord, ProducedObject, Store
from dicom_node.store.spool import ensure_spooled, write_instance
from tests.dicom_node.test_cli_node import assert_one_line_error
from tests.dicom_node.test_cli_node import node as run_cli
from tests.faults.test_kill_and_disk import send_statuses
from tests.support.corpus import write_synthetic_set
from tests.support.node import NodeProcess
from tests.support.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)

OLD = "1.2.826.0.1.3680043.8.498.13"
KEPT = "1.2.826.0.1.3680043.8.498.14"


def finish(store: Store, study: str, version: int = 1) -> None:
    for to_state in ("stable", "queued", "analyzing", "analyzed", "delivering", "done"):
        assert store.transition_study(study, version, tuple(STUDY_STATES), to_state)


def test_serve_purges_an_expired_study_at_start_up_and_a_late_instance_reopens_it(tmp_path: Path) -> None:
    old_files = write_synthetic_set(tmp_path / "old", 2, study_uid=OLD)
    [kept_file] = write_synthetic_set(tmp_path / "kept", 1, study_uid=KEPT)
    site = NodeProcess(tmp_path / "node", settings={"assembly": {"quiet_period_s": 600, "hard_cap_s": 600}})
    site.add_source("modality", "MODALITY")
    site.start()
    assert send_statuses(site.port, [*old_files, kept_file]) == [0x0000] * 3
    site.stop()

    store = site.open_store()
    try:
        finish(store, OLD)
        result_file = site.data_dir / "results" / OLD / "v1" / "sr.dcm"
        result_file.parent.mkdir(parents=True)
        result_file.write_bytes(b"result object")
        store.record_produced_object(ProducedObject(OLD, 1, "x", "sr", "5.9", "1.2.840.10008.5.1.4.1.1.88.34", f"{OLD}/v1/sr.dcm", datetime.now(UTC)))
        spooled_old = [site.spool_dir / i.path for i in store.list_instances(OLD)]
        assert len(spooled_old) == 2 and all(p.exists() for p in spooled_old)
        old_bytes = sum(p.stat().st_size for p in spooled_old)
    finally:
        store.close()
    time.sleep(1.0)

    site.settings["storage"] = {"retention_days": 0.5 / 86400}  # half a second
    site.start()
    try:
        deadline = time.monotonic() + 30
        while "retention: purged" not in site.log_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "retention: purged 1 studies" in site.log_text(), site.log_text()[-3000:]
        store = site.open_store()
        try:
            assert store.get_study(OLD).state == "purged" and store.list_instances(OLD) == []
            assert store.get_study(KEPT).state == "receiving"  # not finished: never purged
            assert len(store.list_instances(KEPT)) == 1
            assert not any(p.exists() for p in spooled_old)
            assert not (site.spool_dir / OLD).exists() and not (site.data_dir / "results" / OLD).exists()
            events = {e.study_instance_uid: e.detail for e in store.list_audit_events("study_purged")}
            assert events[OLD]["instances"] == 2 and events[OLD]["produced_objects"] == 1
            assert events[OLD]["bytes"] == old_bytes

            # The sender re-sends one of the purged instances: accepted, the study reopens as version 2.
            assert send_statuses(site.port, [old_files[0]]) == [0x0000]
            study = store.get_study(OLD)
            assert (study.state, study.version) == ("receiving", 2)
            [again] = store.list_instances(OLD)
            assert (site.spool_dir / again.path).exists() and again.study_version == 2
        finally:
            store.close()
    finally:
        site.stop()


def test_a_duplicate_resent_while_its_study_is_purged_is_written_again(tmp_path: Path) -> None:
    """Replays the SCP's steps around a purge: write (finds the file), purge, record, ensure."""
    settings = Settings().with_overrides(storage={"data_dir": tmp_path / "var", "min_free_bytes": 0})
    (settings.storage.spool_dir / ".tmp").mkdir(parents=True)
    store = open_store(f"sqlite:///{tmp_path / 'var' / 'anatomix.db'}")
    try:
        [path] = write_synthetic_set(tmp_path / "set", 1, study_uid=OLD)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        parts = [path.read_bytes()]

        def record(spooled) -> InstanceRecord:
            return InstanceRecord(
                sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID), study_instance_uid=OLD,
                series_instance_uid=str(ds.SeriesInstanceUID), transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=spooled.relative_path, size=spooled.size, sha256=spooled.sha256, calling_ae="MODALITY",
                received_at=datetime.now(UTC),
            )  # fmt: skip

        first = write_instance(settings.storage.spool_dir, OLD, str(ds.SOPInstanceUID), parts)
        store.record_instance(record(first))
        finish(store, OLD)

        again = write_instance(settings.storage.spool_dir, OLD, str(ds.SOPInstanceUID), parts)  # the re-send
        assert not again.created  # the SCP found the file already there
        report = purge_expired(settings, store, open_audit_trail(store, None), days=0, now=datetime.now(UTC) + timedelta(seconds=1))
        assert [p.study_instance_uid for p in report.purged] == [OLD]
        target = settings.storage.spool_dir / again.relative_path
        assert not target.exists()  # the purge removed the file the re-send relies on
        outcome = store.record_instance(record(again))  # committed after the purge: reopens the study
        assert outcome.kind == "new" and outcome.reopened_study
        ensure_spooled(settings.storage.spool_dir, again, OLD, str(ds.SOPInstanceUID), parts)
        assert target.read_bytes() == parts[0]
    finally:
        store.close()


def test_purge_command_dry_run_real_run_and_refusal(tmp_path: Path) -> None:
    site = NodeProcess(tmp_path / "node")
    config = site.write_config()
    (site.spool_dir / ".tmp").mkdir(parents=True)
    store = site.open_store()
    try:
        [path] = write_synthetic_set(tmp_path / "set", 1, study_uid=OLD)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        spooled = write_instance(site.spool_dir, OLD, str(ds.SOPInstanceUID), [path.read_bytes()])
        store.record_instance(InstanceRecord(
            str(ds.SOPInstanceUID), str(ds.SOPClassUID), OLD, str(ds.SeriesInstanceUID), "1.2.840.10008.1.2.1",
            spooled.relative_path, spooled.size, spooled.sha256, "MODALITY", datetime.now(UTC),
        ))  # fmt: skip
        finish(store, OLD)
    finally:
        store.close()
    time.sleep(0.2)

    refused = run_cli(tmp_path, "purge", "--config", str(config))
    assert_one_line_error(refused, "retention_days is 0", "--older-than-days")

    dry = run_cli(tmp_path, "purge", "--config", str(config), "--older-than-days", "0", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "1 studies done" in dry.stdout and OLD in dry.stdout
    assert (site.spool_dir / spooled.relative_path).exists()

    real = run_cli(tmp_path, "purge", "--config", str(config), "--older-than-days", "0")
    assert real.returncode == 0, real.stderr
    assert "purged 1 studies done" in real.stdout and "1 instances" in real.stdout
    assert not (site.spool_dir / spooled.relative_path).exists()
    listed = run_cli(tmp_path, "studies", "--config", str(config), "--state", "purged")
    assert listed.returncode == 0 and OLD in listed.stdout and "purged" in listed.stdout


# ---- the policy states, on both stores ----------------------------------------------------------------

#: How a study reaches each state a policy might see (``purged`` is already a tombstone).
PATHS_TO_STATE = {
    "receiving": (),
    "stable": ("stable",),
    "queued": ("stable", "queued"),
    "analyzing": ("stable", "queued", "analyzing"),
    "analyzed": ("stable", "queued", "analyzing", "analyzed"),
    "delivering": ("stable", "queued", "analyzing", "analyzed", "delivering"),
    "done": ("stable", "queued", "analyzing", "analyzed", "delivering", "done"),
    "failed": ("stable", "queued", "analyzing", "failed"),
}


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'var' / 'anatomix.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def policy_site(tmp_path: Path, store_url: str) -> Iterator[tuple[Settings, Store, dict[str, str]]]:
    """One study per state, each with a spooled instance and a result file; {state: study UID}."""
    settings = Settings().with_overrides(storage={"data_dir": tmp_path / "var", "min_free_bytes": 0})
    (settings.storage.spool_dir / ".tmp").mkdir(parents=True)
    store = open_store(store_url)
    studies: dict[str, str] = {}
    try:
        for index, (state, path) in enumerate(PATHS_TO_STATE.items()):
            study = f"1.2.826.0.1.3680043.8.498.15.{index + 1}"
            studies[state] = study
            [source] = write_synthetic_set(tmp_path / "sets" / state, 1, study_uid=study)
            ds = pydicom.dcmread(source, stop_before_pixels=True)
            spooled = write_instance(settings.storage.spool_dir, study, str(ds.SOPInstanceUID), [source.read_bytes()])
            store.record_instance(InstanceRecord(
                str(ds.SOPInstanceUID), str(ds.SOPClassUID), study, str(ds.SeriesInstanceUID), "1.2.840.10008.1.2.1",
                spooled.relative_path, spooled.size, spooled.sha256, "MODALITY", datetime.now(UTC),
            ))  # fmt: skip
            result = settings.storage.results_dir / study / "v1" / "sr.dcm"
            result.parent.mkdir(parents=True)
            result.write_bytes(b"result object")
            store.record_produced_object(ProducedObject(
                study, 1, str(ds.SOPInstanceUID), "sr", study + ".9", "1.2.840.10008.5.1.4.1.1.88.34",
                f"{study}/v1/sr.dcm", datetime.now(UTC),
            ))  # fmt: skip
            for to_state in path:
                assert store.transition_study(study, 1, tuple(STUDY_STATES), to_state)
            assert store.get_study(study).state == state
        yield settings, store, studies
    finally:
        store.close()


def state_of_the_site(settings: Settings, store: Store, studies: dict[str, str]) -> dict[str, tuple[str, int, int, bool]]:
    """{state it was set up in: (state now, instance rows, spooled files, result file present)}."""
    seen = {}
    for state, study in studies.items():
        record = store.get_study(study)
        spooled = list((settings.storage.spool_dir / study).glob("*.dcm")) if (settings.storage.spool_dir / study).exists() else []
        seen[state] = (
            record.state, len(store.list_instances(study)), len(spooled),
            (settings.storage.results_dir / study / "v1" / "sr.dcm").exists(),
        )  # fmt: skip
    return seen


@pytest.mark.parametrize("retention_states", [("done",), ("done", "failed")], ids=["done-only", "done-and-failed"])
def test_retention_purges_exactly_the_states_of_the_policy(policy_site: tuple[Settings, Store, dict[str, str]], retention_states: tuple[str, ...]) -> None:
    settings, store, studies = policy_site
    settings = settings.with_overrides(storage={"retention_days": 1.0, "retention_states": list(retention_states)})
    assert settings.storage.retention_states == retention_states
    # Every study is older than the cutoff: only the policy's states may decide.
    later = datetime.now(UTC) + timedelta(days=2)
    dry = purge_expired(settings, store, now=later, dry_run=True)
    assert sorted(dry.candidates) == sorted(studies[s] for s in retention_states)

    report = purge_expired(settings, store, open_audit_trail(store, None), now=later)
    assert sorted(p.study_instance_uid for p in report.purged) == sorted(studies[s] for s in retention_states)
    after = state_of_the_site(settings, store, studies)
    for state in PATHS_TO_STATE:
        if state in retention_states:
            assert after[state] == ("purged", 0, 0, False), state
        else:  # kept on purpose: the same state, its rows, its image and its result
            assert after[state] == (state, 1, 1, True), state
    assert sorted(e.study_instance_uid for e in store.list_audit_events("study_purged")) == sorted(studies[s] for s in retention_states)


def test_a_file_that_cannot_be_removed_fails_the_pass_and_the_next_pass_completes_it(
    policy_site: tuple[Settings, Store, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The purge deletes the rows and removes the files under the study's lock, in one transaction.
    A file the OS refuses to remove (EIO here, injected in ``os.unlink`` for that path only) makes
    the pass fail: the transaction rolls back, so the study is still ``done`` with its rows, no
    tombstone and no audit event. The next pass purges it, and nothing is left in the spool that
    the start-up reconciliation would record again (a purged study must not come back)."""
    settings, store, studies = policy_site
    done = studies["done"]
    [instance] = store.list_instances(done)
    stuck = (settings.storage.spool_dir / instance.path).resolve()
    real_unlink = os.unlink

    def failing_unlink(path, *args, **kwargs):
        if Path(os.path.abspath(path)).resolve() == stuck:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real_unlink(path, *args, **kwargs)

    later = datetime.now(UTC) + timedelta(days=2)
    trail = open_audit_trail(store, None)
    monkeypatch.setattr(os, "unlink", failing_unlink)
    with pytest.raises(OSError) as raised:
        purge_expired(settings, store, trail, days=1.0, now=later)
    assert raised.value.errno == errno.EIO
    study = store.get_study(done)
    assert study.state == "done" and "purged" not in study.state_times
    assert [i.path for i in store.list_instances(done)] == [instance.path] and stuck.exists()
    assert store.list_audit_events("study_purged") == []

    monkeypatch.setattr(os, "unlink", real_unlink)  # the disk is healthy again
    report = purge_expired(settings, store, trail, days=1.0, now=later)
    assert [p.study_instance_uid for p in report.purged] == [done]
    assert store.get_study(done).state == "purged" and not stuck.exists()
    assert reconcile_spool(settings.storage.spool_dir, store).recovered == []
    assert store.get_study(done).state == "purged"


def test_the_retention_loop_survives_a_failing_pass_and_the_next_pass_purges(
    policy_site: tuple[Settings, Store, dict[str, str]], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``serve``'s retention thread: a pass that fails (a file the OS refuses to remove) is logged,
    and the loop goes on; its next pass purges the study. The interval is shortened to 10 ms; the
    test waits for the outcome (the audit event), never for a time."""
    import threading

    from dicom_node.pipeline import retention

    settings, store, studies = policy_site
    settings = settings.with_overrides(storage={"retention_days": 1e-9})
    [instance] = store.list_instances(studies["done"])
    stuck = (settings.storage.spool_dir / instance.path).resolve()
    real_unlink = os.unlink
    failures = []

    def unlink_failing_once(path, *args, **kwargs):
        if Path(os.path.abspath(path)).resolve() == stuck and not failures:
            failures.append(path)
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink_failing_once)
    monkeypatch.setattr(retention, "RETENTION_INTERVAL_S", 0.01)
    stop = threading.Event()
    loop = threading.Thread(target=retention.run_retention, args=(settings, store, open_audit_trail(store, None), stop))
    time.sleep(0.01)  # a minimum age (retention_days = 1e-9 days = 86 us), not a wait for an event
    with caplog.at_level("ERROR", logger="dicom_node.pipeline.retention"):
        loop.start()
        try:
            deadline = time.monotonic() + 60
            while not store.list_audit_events("study_purged") and loop.is_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            stop.set()
            loop.join(30)
    assert failures, "the injected failure never happened"
    assert "retention pass failed" in caplog.text and "Input/output error" in caplog.text
    assert [e.study_instance_uid for e in store.list_audit_events("study_purged")] == [studies["done"]]
    assert store.get_study(studies["done"]).state == "purged" and not stuck.exists()
    assert store.get_study(studies["failed"]).state == "failed"
