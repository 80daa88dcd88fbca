"""The SCP's promise at the exact point it records an instance, with a real sender and real stores.

"Nothing is ever acknowledged that is not durable": the handler spools the bytes (data sync,
rename, directory sync), records the instance in the state store, and only then answers Success.
These tests hold or break the state store *at the moment the SCP records the instance* and watch
what the sender hears and what is left on disk and in the database:

- the store failing right there (a real failure of the real backend: SQLite's write lock held by
  another connection, PostgreSQL's connection terminated by the server) answers 0xA700 and leaves
  no spooled file and no row; a file an earlier, acknowledged copy owns is never removed;
- the recording held on an event: the sender has no answer while it is held, and when the Success
  arrives the row is already committed; the durability calls all came before the recording.

The store is the real one behind a thin proxy (:class:`HookedStore`) that runs a test hook around
``record_instance`` only; the SCP is the same :class:`~dicom_node.net.scp.StorageScp` the node runs.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pydicom
import pytest
from pynetdicom import AE

from dicom_node.audit.trail import open_audit_trail
from dicom_node.net.scp import StorageScp, build_ae
from dicom_node.settings import Settings
from dicom_node.store import open_store
from dicom_node.store.base import InstanceRecord, RecordOutcome, RemoteNode, Store, StoreUnavailable
from dicom_node.store.sqlite import SqliteStore
from tests.dicom_node.test_spool import OsCallRecorder, assert_durably_written
from tests.support.corpus import write_synthetic_set
from tests.support.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)

STUDY = "1.2.826.0.1.3680043.8.498.41"
CR = "1.2.840.10008.5.1.4.1.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


class HookedStore:
    """A real store; ``before_record``/``after_record`` run around each ``record_instance``.

    Everything else goes straight to the real store. ``record_errors`` keeps what the real
    ``record_instance`` raised, so a test can show the failure came from the backend itself.
    """

    def __init__(self, real: Store) -> None:
        self.real = real
        self.before_record: Callable[[InstanceRecord], None] | None = None
        self.after_record: Callable[[InstanceRecord], None] | None = None
        self.record_calls = 0
        self.record_errors: list[BaseException] = []

    def record_instance(self, instance: InstanceRecord, **sender: str | None) -> RecordOutcome:
        self.record_calls += 1
        if self.before_record is not None:
            self.before_record(instance)
        try:
            return self.real.record_instance(instance, **sender)
        except BaseException as exc:
            self.record_errors.append(exc)
            raise
        finally:
            if self.after_record is not None:
                self.after_record(instance)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@dataclass
class HookedScp:
    settings: Settings
    store: HookedStore
    url: str
    port: int
    server: Any = None
    audit_path: Path | None = None

    @property
    def spool(self) -> Path:
        return self.settings.storage.spool_dir

    def spooled(self) -> list[Path]:
        return sorted(self.spool.rglob("*.dcm"))

    def temp_files(self) -> list[Path]:
        return sorted((self.spool / ".tmp").iterdir())


def sqlite_store(url: str) -> Store:
    """The SQLite store with a short busy timeout, so a held write lock fails a write in 0.3 s."""
    open_store(url).close()  # creates and migrates the file
    return SqliteStore(url.removeprefix("sqlite:///"), busy_timeout_s=0.3)


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'var' / 'anatomix.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def scp(tmp_path: Path, store_url: str) -> Iterator[HookedScp]:
    settings = Settings().with_overrides(storage={"data_dir": tmp_path / "var", "min_free_bytes": 0})
    (settings.storage.spool_dir / ".tmp").mkdir(parents=True)
    real = sqlite_store(store_url) if store_url.startswith("sqlite") else open_store(store_url)
    real.add_remote_node(RemoteNode(name="modality", ae_title="MODALITY", host="127.0.0.1", port=104, role="source"))
    store = HookedStore(real)
    scp_handlers = StorageScp(settings, store, open_audit_trail(real, ""))  # type: ignore[arg-type]
    # Port 0: the kernel picks a free port at bind time, so no other test can take it meanwhile.
    server = build_ae(settings).start_server(("127.0.0.1", 0), block=False, evt_handlers=scp_handlers.event_handlers())
    running = HookedScp(settings, store, store_url, server.server_address[1], server)
    try:
        yield running
    finally:
        running.server.shutdown()
        real.close()


@dataclass
class Sender:
    """A pynetdicom SCU with one association; ``send`` returns the status, or None when none came."""

    port: int
    ae: AE = field(init=False)
    assoc: Any = None

    def __post_init__(self) -> None:
        self.ae = AE(ae_title="MODALITY")
        self.ae.add_requested_context(CR, EXPLICIT_LE)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 60

    def __enter__(self) -> Sender:
        self.assoc = self.ae.associate("127.0.0.1", self.port, ae_title="ANATOMIX")
        assert self.assoc.is_established, "association refused"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.assoc.is_established:
            self.assoc.release()

    def send(self, path: Path) -> tuple[int | None, str | None]:
        response = self.assoc.send_c_store(pydicom.dcmread(path))
        if "Status" not in response:
            return None, None
        return int(response.Status), str(response.get("ErrorComment", "")) or None


# ---- injected failures -----------------------------------------------------------------------------


def fail_the_backend(scp: HookedScp) -> tuple[Callable[[InstanceRecord], None], Callable[[InstanceRecord], None]]:
    """(before, after) hooks that make the real backend fail the recording, and then heal it.

    SQLite: another connection holds the database's write lock until the recording is over (the
    store's ``BEGIN IMMEDIATE`` times out: "database is locked"). PostgreSQL: the server terminates
    the store's connections (pg_terminate_backend), waited for until they are gone; the store's
    next statement fails ("terminating connection due to administrator command").
    """
    if scp.url.startswith("sqlite"):
        holder: list[sqlite3.Connection] = []

        def lock(_: InstanceRecord) -> None:
            conn = sqlite3.connect(scp.url.removeprefix("sqlite:///"), isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
            holder.append(conn)

        def unlock(_: InstanceRecord) -> None:
            while holder:
                conn = holder.pop()
                conn.execute("ROLLBACK")
                conn.close()

        return lock, unlock

    database = scp.url.rsplit("/", 1)[1]
    admin_url = scp.url.rsplit("/", 1)[0] + "/postgres"

    def terminate(_: InstanceRecord) -> None:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            pids = [row[0] for row in admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = 'anatomix-node'", (database,)
            )]  # fmt: skip
            assert pids, "the store has no connection to terminate"
            for pid in pids:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            # pg_terminate_backend only signals: wait (on a condition, not a clock) until they are gone.
            deadline = time.monotonic() + 30
            while admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)).fetchone()[0]:
                assert time.monotonic() < deadline, "terminated backends did not exit"
                time.sleep(0.01)

    return terminate, lambda _: None


@contextmanager
def other_connection(url: str) -> Iterator[Store]:
    """A second, independent connection to the database: what another process would see."""
    store = open_store(url, migrate=False)
    try:
        yield store
    finally:
        store.close()


# ---- the store fails exactly when the instance is recorded --------------------------------------------


def test_store_failing_when_the_instance_is_recorded_answers_out_of_resources_and_leaves_nothing(scp: HookedScp, tmp_path: Path) -> None:
    first, second = write_synthetic_set(tmp_path / "push", 2, study_uid=STUDY)
    scp.store.before_record, scp.store.after_record = fail_the_backend(scp)
    with Sender(scp.port) as sender:
        status, comment = sender.send(first)
        assert (status, comment) == (0xA700, "state store unavailable")
        # The failure came from the real backend, at the recording of this very instance.
        assert scp.store.record_calls == 1
        assert [type(e) for e in scp.store.record_errors] == [StoreUnavailable]
        # Nothing left behind: no file under a final name, no partial file, no row, no study.
        assert scp.spooled() == [] and scp.temp_files() == []
        with other_connection(scp.url) as store:
            assert store.list_instances(STUDY) == [] and store.list_studies() == []

        # The store is back: the sender's retry on the same association is stored, once.
        scp.store.before_record = scp.store.after_record = None
        assert sender.send(first) == (0x0000, None)
        assert sender.send(second) == (0x0000, None)
    with other_connection(scp.url) as store:
        recorded = store.list_instances(STUDY)
    assert len(recorded) == 2
    assert sorted(str(scp.spool / r.path) for r in recorded) == [str(p) for p in scp.spooled()]


def test_store_failing_for_a_resent_duplicate_keeps_the_acknowledged_file(scp: HookedScp, tmp_path: Path) -> None:
    """A re-send of acknowledged bytes finds its file already in the spool (same content address).
    If the store fails when recording the re-send, the answer is 0xA700, and the file stays: it is
    the acknowledged copy's, which its row still points to."""
    [path] = write_synthetic_set(tmp_path / "push", 1, study_uid=STUDY)
    with Sender(scp.port) as sender:
        assert sender.send(path) == (0x0000, None)
        [acknowledged] = scp.spooled()
        content = acknowledged.read_bytes()
        scp.store.before_record, scp.store.after_record = fail_the_backend(scp)
        assert sender.send(path)[0] == 0xA700
        assert scp.store.record_errors and isinstance(scp.store.record_errors[-1], StoreUnavailable)
    assert scp.spooled() == [acknowledged] and acknowledged.read_bytes() == content
    with other_connection(scp.url) as store:
        [row] = store.list_instances(STUDY)
    assert scp.spool / row.path == acknowledged


# ---- no answer before the recording ----------------------------------------------------------------------


def test_success_is_not_answered_before_the_instance_is_recorded(scp: HookedScp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recording is held on an event. While it is held the sender has no answer; when the
    Success arrives, the row is already committed (seen from another connection at that moment);
    and every durability step of the spool write came before the recording.

    The one bounded wait (``HOLD_S``) only gives a premature answer time to show up: on the right
    code no answer can come while the recording is held, however long the wait.
    """
    HOLD_S = 2.0
    [path] = write_synthetic_set(tmp_path / "push", 1, study_uid=STUDY)
    sop_uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    os_calls = OsCallRecorder(scp.spool).install(monkeypatch)
    recording, release = threading.Event(), threading.Event()

    def hold(_: InstanceRecord) -> None:
        os_calls.mark("recording")
        recording.set()
        assert release.wait(60), "the test never released the recording"

    scp.store.before_record = hold
    scp.store.after_record = lambda _: os_calls.mark("recorded")
    answered = threading.Event()
    outcome: dict[str, Any] = {}

    def send() -> None:
        try:
            with Sender(scp.port) as sender:
                outcome["status"] = sender.send(path)
                # At the moment the sender holds the answer: what does the database say?
                with other_connection(scp.url) as store:
                    outcome["rows_at_answer"] = [i.sop_instance_uid for i in store.list_instances(STUDY)]
                answered.set()
        except BaseException as exc:  # reported by the main thread
            outcome["error"] = exc
            answered.set()

    sender = threading.Thread(target=send, name="sender")
    sender.start()
    try:
        assert recording.wait(60), "the SCP never started recording"
        assert not answered.wait(HOLD_S), f"the sender was answered while the recording was held: {outcome}"
    finally:
        release.set()
        sender.join(60)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["status"] == (0x0000, None)
    assert outcome["rows_at_answer"] == [sop_uid]
    # Durability before recording: data sync -> rename -> directory syncs, all before the record.
    with other_connection(scp.url) as store:
        [row] = store.list_instances(STUDY)
    last_sync = assert_durably_written(os_calls, scp.spool, row.path, row.size, new_study_dir=True)
    recording_at = dict((label, at) for at, label in os_calls.marks)["recording"]
    assert last_sync < recording_at, f"recorded before the spool write was durable: {os_calls.calls} {os_calls.marks}"


def test_dcmtk_storescu_hears_out_of_resources_when_the_store_fails(scp: HookedScp, tmp_path: Path) -> None:
    """The same failure as a third-party sender sees it: DCMTK storescu is refused, out of resources."""
    from tests.support.dcmtk import storescu

    [path] = write_synthetic_set(tmp_path / "push", 1, study_uid=STUDY)
    scp.store.before_record, scp.store.after_record = fail_the_backend(scp)
    result = storescu(scp.port, [path], "MODALITY", "ANATOMIX", "-v", timeout=120)
    output = result.stdout + result.stderr
    # DCMTK names the 0xA7xx class; the exact 0xA700 is checked with pynetdicom above.
    assert "Received Store Response (Refused: OutOfResources)" in output, output[-2000:]
    assert [type(e) for e in scp.store.record_errors] == [StoreUnavailable]
    assert scp.spooled() == [] and scp.temp_files() == []
    with other_connection(scp.url) as store:
        assert store.list_instances(STUDY) == [] and store.list_studies() == []
