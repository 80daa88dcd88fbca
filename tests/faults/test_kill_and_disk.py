"""Crash and out-of-space faults against the real node (subprocess, its own process group).

- SIGKILL of the whole node (supervisor + SCP processes) in the middle of a 200-instance push:
  every instance acknowledged before the kill is in the spool (intact) and in the database after
  restart; no partial file survives; the sender's retry completes the study with exactly 200.
- Spool on a tiny tmpfs (real ENOSPC) and a free-space watermark: 0xA700, nothing half-written.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.dsutils import split_dataset

from tests.support.corpus import write_synthetic_set
from tests.support.node import NodeProcess

STUDY = "1.2.826.0.1.3680043.8.498.11"


def dataset_bytes(path: Path) -> bytes:
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def send_and_record(
    port: int,
    files: list[Path],
    acknowledged: dict[str, Path],
    stop_after_failure: bool = True,
    hold_before: tuple[int, threading.Event] | None = None,
) -> None:
    """pynetdicom SCU (one association): note every instance answered 0x0000, stop at the first miss.

    ``hold_before = (n, event)``: wait for ``event`` before sending file number ``n`` (0-based), so a
    test that kills the node mid-push knows the push cannot finish before the kill, however slowly
    the test's own thread is scheduled.
    """
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="ANATOMIX")
    if not assoc.is_established:
        return
    for index, path in enumerate(files):
        if hold_before is not None and index == hold_before[0]:
            hold_before[1].wait(120)
        try:
            status = assoc.send_c_store(pydicom.dcmread(path))
        except (RuntimeError, OSError):
            break
        if "Status" in status and status.Status == 0x0000:
            acknowledged[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
        elif stop_after_failure:
            break
        if not assoc.is_established:
            break
    if assoc.is_established:
        assoc.release()


def test_sigkill_mid_push_loses_nothing_acknowledged(tmp_path: Path) -> None:
    files = write_synthetic_set(tmp_path / "push", 200, study_uid=STUDY, rows=128, columns=128)
    node = NodeProcess(tmp_path / "node", scp_processes=2, settings={"assembly": {"quiet_period_s": 2.0}})
    node.add_source("modality", "MODALITY")
    node.start()
    acknowledged: dict[str, Path] = {}
    killed = threading.Event()
    # The sender pushes freely up to file 150 and waits there for the kill: the kill lands mid-push
    # (mid-C-STORE as a rule) however the two threads are scheduled, never after the last file.
    sender = threading.Thread(target=send_and_record, args=(node.port, files, acknowledged), kwargs={"hold_before": (150, killed)})
    sender.start()
    try:
        deadline = time.monotonic() + 120
        while len(acknowledged) < 60 and time.monotonic() < deadline and sender.is_alive():
            time.sleep(0.01)
        assert len(acknowledged) >= 60, "the push did not get going"
        node.kill()  # SIGKILL to supervisor and SCP processes at once, mid-association
        killed.set()
        sender.join(timeout=60)
    finally:
        killed.set()
        node.kill()
    assert 60 <= len(acknowledged) <= 150, f"kill should land mid-push, {len(acknowledged)} acknowledged"

    # Restart: what was acknowledged is there, intact and recorded; no partial file survives.
    node.start()
    try:
        assert node.temp_files() == []
        store = node.open_store()
        try:
            recorded = {i.sop_instance_uid: i for i in store.list_instances(STUDY)}
            for uid, source in acknowledged.items():
                assert uid in recorded, f"acknowledged {uid} missing from the database"
                spooled = node.spool_dir / recorded[uid].path
                assert dataset_bytes(spooled) == dataset_bytes(source), f"acknowledged {uid} changed on disk"
            for record in recorded.values():
                spooled = node.spool_dir / record.path
                assert spooled.exists(), f"recorded {record.sop_instance_uid} has no file"
                ds = pydicom.dcmread(spooled)
                assert ds.pixel_array.shape == (128, 128)
            # The sender retries the whole study: acknowledged ones are duplicates, the rest are new.
            # (A file renamed into place but not recorded before the kill gets the same content
            # address, so the retry records it without a second copy.)
            retried: dict[str, Path] = {}
            send_and_record(node.port, files, retried, stop_after_failure=False)
            assert len(retried) == 200
            instances = store.list_instances(STUDY)
            assert len(instances) == 200
            assert len({i.sop_instance_uid for i in instances}) == 200
            assert len(node.spooled_files()) == 200
            # The study then closes (quiet period) and, with no model configured, fails within a
            # millisecond: watch the recorded state history, which keeps "stable", not the live
            # state, which may already have moved on. The current version must have become stable
            # after its last instance arrived.
            deadline = time.monotonic() + 60
            study = store.get_study(STUDY)
            while study is not None and "stable" not in study.state_times and time.monotonic() < deadline:
                time.sleep(0.2)
                study = store.get_study(STUDY)
            assert study is not None and "stable" in study.state_times, f"never closed: {study}"
            assert study.instance_count == 200
            last_received = max(i.received_at for i in store.list_instances(STUDY, version=study.version))
            assert study.state_times["stable"] >= last_received
            assert study.state in ("stable", "queued", "failed"), study.state  # no model: never analysed
        finally:
            store.close()
    finally:
        node.stop()


def test_restart_records_a_spooled_file_a_crash_left_unrecorded(tmp_path: Path) -> None:
    """The crash window between the spool rename and the database commit, reproduced with the
    SCP's own write path: the restart records the file (audited), quarantines a file whose content
    does not match its name, and a later re-send of the recovered instance is a duplicate."""
    from dicom_node.store.spool import write_instance

    study = "1.2.826.0.1.3680043.8.498.12"
    first, orphan, damaged = write_synthetic_set(tmp_path / "push", 3, study_uid=study)
    node = NodeProcess(tmp_path / "node", settings={"assembly": {"quiet_period_s": 600, "hard_cap_s": 600}})
    node.add_source("modality", "MODALITY")
    node.start()
    assert send_statuses(node.port, [first]) == [0x0000]
    node.stop()
    # The exact bytes the SCP writes for the orphan (its own File Meta + the data set as sent):
    # take them from a scratch node that received it.
    scratch = NodeProcess(tmp_path / "scratch")
    scratch.add_source("modality", "MODALITY")
    scratch.start()
    try:
        assert send_statuses(scratch.port, [orphan]) == [0x0000]
        [written] = scratch.spooled_files()
    finally:
        scratch.stop()

    orphan_uid = str(pydicom.dcmread(orphan, stop_before_pixels=True).SOPInstanceUID)
    spooled = write_instance(node.spool_dir, study, orphan_uid, [written.read_bytes()])
    assert spooled.created and spooled.relative_path == str(written.relative_to(scratch.spool_dir))
    bad = write_instance(node.spool_dir, study, "1.2.826.0.1.3680043.8.498.12.9", [damaged.read_bytes()])
    bad_path = node.spool_dir / bad.relative_path
    bad_path.write_bytes(bad_path.read_bytes()[:-100])  # truncated after the rename: name and content disagree

    node.start()
    try:
        store = node.open_store()
        try:
            recorded = {i.sop_instance_uid: i for i in store.list_instances(study)}
            assert sorted(recorded) == sorted([str(pydicom.dcmread(first, stop_before_pixels=True).SOPInstanceUID), orphan_uid])
            assert recorded[orphan_uid].path == spooled.relative_path
            assert recorded[orphan_uid].sha256 == spooled.sha256
            events = store.list_audit_events("instance_recovered")
            assert [e.sop_instance_uid for e in events] == [orphan_uid]
            assert not bad_path.exists()
            assert (node.spool_dir / ".quarantine" / study / bad_path.name).exists()
            assert "content does not match its name" in node.log_text()

            assert send_statuses(node.port, [orphan]) == [0x0000]  # the sender's late retry
            assert len([i for i in store.list_instances(study) if i.sop_instance_uid == orphan_uid]) == 1
        finally:
            store.close()
    finally:
        node.stop()


def send_statuses(port: int, files: list[Path]) -> list[int | None]:
    """One association, every file, the DIMSE status of each (None when no response came)."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="ANATOMIX")
    assert assoc.is_established
    statuses = []
    for path in files:
        status = assoc.send_c_store(pydicom.dcmread(path))
        statuses.append(int(status.Status) if "Status" in status else None)
    assoc.release()
    return statuses


def mount_tmpfs(target: Path, options: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({result.stderr.strip() or 'mount failed'}; needs root or CAP_SYS_ADMIN); the watermark test covers 0xA700 without it"
        )


def test_full_spool_file_system_answers_out_of_resources_without_partial_files(tmp_path: Path) -> None:
    files = write_synthetic_set(tmp_path / "big", 5, study_uid=STUDY + ".2", rows=1200, columns=1200)  # ~2.9 MB each
    node = NodeProcess(tmp_path / "node")
    node.add_source("modality", "MODALITY")
    mount_tmpfs(node.spool_dir, "size=7m")  # room for two instances, not three
    try:
        node.start()
        try:
            statuses = send_statuses(node.port, files)
            assert statuses[:2] == [0x0000, 0x0000], statuses
            assert all(s == 0xA700 for s in statuses[2:]), statuses
            assert node.temp_files() == []
            spooled = node.spooled_files()
            assert len(spooled) == 2
            for path in spooled:  # what was written is complete
                assert pydicom.dcmread(path).pixel_array.shape == (1200, 1200)
            store = node.open_store()
            try:
                assert len(store.list_instances(STUDY + ".2")) == 2
            finally:
                store.close()
            assert "answered 0xA700" in node.log_text() and "bytes free" in node.log_text()
            # Space freed (an admin cleans up): the sender's retry of the refused ones succeeds.
            for path in spooled:
                path.unlink()
            assert send_statuses(node.port, files[2:4]) == [0x0000, 0x0000]
        finally:
            node.stop()
    finally:
        subprocess.run(["umount", str(node.spool_dir)], check=False)


def test_free_space_watermark_answers_out_of_resources(tmp_path: Path) -> None:
    files = write_synthetic_set(tmp_path / "small", 2, study_uid=STUDY + ".3")
    node = NodeProcess(tmp_path / "node", settings={"storage": {"min_free_bytes": 1 << 60}})
    node.add_source("modality", "MODALITY")
    node.start()
    try:
        assert send_statuses(node.port, files) == [0xA700, 0xA700]
        assert node.spooled_files() == [] and node.temp_files() == []
        store = node.open_store()
        try:
            assert store.list_instances(STUDY + ".3") == []
        finally:
            store.close()
        assert "below free-space watermark" in node.log_text() or "storage.min_free_bytes" in node.log_text()
    finally:
        node.stop()


def test_enospc_from_the_file_system_answers_out_of_resources(tmp_path: Path) -> None:
    """Bytes free but no inode left: the kernel's own ENOSPC reaches the handler, not our pre-check."""
    files = write_synthetic_set(tmp_path / "small", 3, study_uid=STUDY + ".4")
    node = NodeProcess(tmp_path / "node")
    node.add_source("modality", "MODALITY")
    # Inodes: the root, .tmp, one study directory, one instance; the next temp file cannot be created.
    mount_tmpfs(node.spool_dir, "size=8m,nr_inodes=4")
    try:
        node.start()
        try:
            statuses = send_statuses(node.port, files)
            assert statuses == [0x0000, 0xA700, 0xA700], statuses
            assert node.temp_files() == [] and len(node.spooled_files()) == 1
            assert "No space left on device" in node.log_text()
            store = node.open_store()
            try:
                assert len(store.list_instances(STUDY + ".4")) == 1
            finally:
                store.close()
        finally:
            node.stop()
    finally:
        subprocess.run(["umount", str(node.spool_dir)], check=False)
