"""Start-up reconciliation when the state store fails in the middle of it (real SQLite, real files).

``serve`` records every complete spooled file that has no row before the SCP accepts anything
(:func:`dicom_node.pipeline.reconcile.reconcile_spool`). Those files were never acknowledged, and may be the
only copy: a sender that gave up will not send them again. If the store fails while one of them is
recorded (here: another connection holds SQLite's write lock at that exact call), the pass must
fail loudly and leave every file where it is, neither quarantined nor deleted, so that the next
start records them all; the files it had already recorded are not recorded twice.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pydicom
import pytest

from dicom_node.pipeline.reconcile import QUARANTINE_DIR_NAME, reconcile_spool
from dicom_node.store import open_store
from dicom_node.store.base import InstanceRecord, StoreUnavailable
from dicom_node.store.spool import prepare_spool, write_instance
from dicom_node.store.sqlite import SqliteStore
from tests.dicom_node.test_scp_store_faults import HookedStore
from tests.support.corpus import write_synthetic_set

STUDY = "1.2.826.0.1.3680043.8.498.43"


def spool_unrecorded_files(spool: Path, directory: Path, count: int) -> list[Path]:
    """Files as the SCP leaves them when it is killed between the rename and the commit."""
    prepare_spool(spool)
    spooled = []
    for path in write_synthetic_set(directory, count, study_uid=STUDY):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        written = write_instance(spool, STUDY, str(ds.SOPInstanceUID), [path.read_bytes()])
        spooled.append(spool / written.relative_path)
    return sorted(spooled)


def test_a_store_failure_during_reconciliation_moves_nothing_and_the_next_start_records_all(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    files = spool_unrecorded_files(spool, tmp_path / "set", 3)
    database = tmp_path / "anatomix.db"
    open_store(f"sqlite:///{database}").close()
    store = HookedStore(SqliteStore(database, busy_timeout_s=0.3))
    holder: list[sqlite3.Connection] = []

    def lock_on_the_second_file(_: InstanceRecord) -> None:
        if store.record_calls == 2:  # the store goes away exactly while the second file is recorded
            conn = sqlite3.connect(database, isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
            holder.append(conn)

    def unlock(_: InstanceRecord) -> None:
        while holder:
            conn = holder.pop()
            conn.execute("ROLLBACK")
            conn.close()

    store.before_record, store.after_record = lock_on_the_second_file, unlock
    try:
        with pytest.raises(StoreUnavailable):
            reconcile_spool(spool, store)  # type: ignore[arg-type]
        assert [type(e) for e in store.record_errors] == [StoreUnavailable]
        # Every file is where it was, unchanged; nothing went to quarantine.
        assert sorted(spool.rglob("*.dcm")) == files
        assert not (spool / QUARANTINE_DIR_NAME).exists() or list((spool / QUARANTINE_DIR_NAME).rglob("*")) == []
        assert len(store.list_instances(STUDY)) == 1  # the first file, committed before the failure

        # The next start (store healthy): the two others are recorded, the first is not recorded again.
        store.before_record = store.after_record = None
        report = reconcile_spool(spool, store)  # type: ignore[arg-type]
        assert len(report.recovered) == 2 and report.quarantined == []
        recorded = store.list_instances(STUDY)
        assert sorted(str(spool / r.path) for r in recorded) == [str(f) for f in files]
        assert reconcile_spool(spool, store).recovered == []  # type: ignore[arg-type]
    finally:
        unlock(None)  # type: ignore[arg-type]
        store.close()
