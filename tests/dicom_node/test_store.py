"""The state-store suite, run against both backends: SQLite (a file) and PostgreSQL (a real server)."""

from __future__ import annotations

import multiprocessing
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from dicom_node.store import open_store
from dicom_node.store.base import (
    STUDY_STATES,
    AnalysisRecord,
    AuditEvent,
    DeliveryRecord,
    InstanceRecord,
    ProducedObject,
    RemoteNode,
    Store,
    StoreConflict,
    StoreError,
    StoreUnavailable,
)
from dicom_node.store.schema import load_migrations
from tests.support.net import free_port
from tests.support.postgres import postgres_server, postgres_url, start_private_server  # noqa: F401 (fixtures)
from tests.support.stores import store, store_url  # noqa: F401 (fixtures)

STUDY = "1.2.826.0.1.3680043.10.1431.9.1"
CR = "1.2.840.10008.5.1.4.1.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
T0 = datetime(2026, 1, 31, 12, 0, 0, tzinfo=UTC)


def instance(sop: str, sha: str = "a" * 64, study: str = STUDY, at: datetime = T0, calling_ae: str = "MODALITY") -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=sop, sop_class_uid=CR, study_instance_uid=study, series_instance_uid=study + ".1",
        transfer_syntax_uid=EXPLICIT_LE, path=f"{study}/{sop}-{sha[:8]}.dcm", size=1234, sha256=sha,
        calling_ae=calling_ae, received_at=at,
    )  # fmt: skip


# ---- migrations ------------------------------------------------------------------------------------


def test_migrations_apply_once_and_reapplying_is_a_no_op(store_url: str) -> None:
    newest = len(load_migrations("postgres" if store_url.startswith("postgresql") else "sqlite"))
    first = open_store(store_url)
    first.add_remote_node(RemoteNode("pacs", "PACS", "127.0.0.1", 104))
    assert first.migrate() == newest
    assert first.migrate() == newest
    second = open_store(store_url)  # a second start: nothing re-created, data kept
    assert second.schema_version() == newest
    assert [n.name for n in second.list_remote_nodes()] == ["pacs"]
    first.close()
    second.close()


def _open_and_count(args: tuple[str, object]) -> int:
    url, barrier = args
    barrier.wait()  # every starter opens the database at the same moment
    store = open_store(url)
    try:
        return store.schema_version()
    finally:
        store.close()


def test_concurrent_starters_migrate_once(store_url: str) -> None:
    # Eight processes start on a database nobody has opened yet (the SCP forks several at once).
    # On SQLite this once failed with "database is locked" from the WAL switch, which SQLite may
    # refuse without waiting on its busy handler.
    starters = 8
    with multiprocessing.get_context("fork").Manager() as manager:
        barrier = manager.Barrier(starters)
        with multiprocessing.get_context("fork").Pool(starters) as pool:
            versions = pool.map(_open_and_count, [(store_url, barrier)] * starters)
    store = open_store(store_url, migrate=False)
    assert versions == [store.schema_version()] * starters
    assert store.migrate() == versions[0]
    store.close()


def _first_open(args: tuple[str, object]) -> str:
    url, barrier = args
    barrier.wait()
    try:
        open_store(url).close()
    except StoreError as exc:
        return str(exc)
    return "ok"


def test_sqlite_simultaneous_first_opens_all_succeed(tmp_path: Path) -> None:
    # The WAL switch on a brand-new SQLite file is where simultaneous starters collide; one round
    # rarely hits the window, so run many rounds on fresh files.
    starters, rounds = 6, 25
    failures: list[str] = []
    with multiprocessing.get_context("fork").Manager() as manager:
        with multiprocessing.get_context("fork").Pool(starters) as pool:
            for n in range(rounds):
                barrier = manager.Barrier(starters)
                url = f"sqlite:///{tmp_path}/round{n}/state/anatomix.db"
                failures += [r for r in pool.map(_first_open, [(url, barrier)] * starters) if r != "ok"]
    assert failures == []


def test_database_newer_than_the_software_is_refused(store: Store, store_url: str) -> None:
    store.audit(AuditEvent(T0, "probe", None, None, None, None, None, {}))
    if store_url.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as conn:
            conn.execute("INSERT INTO schema_version VALUES (999, 'future', '2030-01-01T00:00:00.000000+00:00')")
    else:
        with psycopg.connect(store_url, autocommit=True) as conn:
            conn.execute("INSERT INTO schema_version VALUES (999, 'future', now())")
    with pytest.raises(StoreError, match="version 999, newer than this anatomix-node"):
        open_store(store_url)


# ---- remote nodes ----------------------------------------------------------------------------------


def test_remote_nodes_crud_and_conflict(store: Store) -> None:
    node = RemoteNode("ct-room", "CR01", "10.0.0.5", 104, role="source", quiet_period_s=5.0, complete_on_release=True)
    store.add_remote_node(node)
    store.add_remote_node(RemoteNode("pacs", "PACS", "127.0.0.1", 4242, role="destination", profile="ohif", default_destination=True))
    assert store.get_remote_node("ct-room") == node
    assert [n.name for n in store.list_remote_nodes()] == ["ct-room", "pacs"]
    with pytest.raises(StoreConflict, match="ct-room"):
        store.add_remote_node(replace(node, ae_title="OTHER"))
    assert store.get_remote_node("ct-room").ae_title == "CR01"  # the conflict changed nothing
    store.update_remote_node(replace(node, port=11112, tls=True, quiet_period_s=None))
    assert store.get_remote_node("ct-room") == replace(node, port=11112, tls=True, quiet_period_s=None)
    with pytest.raises(KeyError):
        store.update_remote_node(replace(node, name="nobody"))
    assert store.remove_remote_node("ct-room") is True
    assert store.remove_remote_node("ct-room") is False
    assert store.get_remote_node("ct-room") is None


def test_find_source_matches_ae_title_role_and_host(store: Store) -> None:
    store.add_remote_node(RemoteNode("room1", "CR01", "10.0.0.5", 104, role="source"))
    store.add_remote_node(RemoteNode("anywhere", "CR02", "*", 104, role="both"))
    store.add_remote_node(RemoteNode("pacs", "PACS", "10.0.0.9", 104, role="destination"))
    store.add_remote_node(RemoteNode("by-name", "CR03", "localhost", 104, role="source"))
    store.add_remote_node(RemoteNode("room1-any", "CR04", "", 104, role="source"))
    store.add_remote_node(RemoteNode("room4-exact", "CR04", "10.0.0.7", 104, role="source"))

    assert store.find_source("CR01", "10.0.0.5").name == "room1"
    assert store.find_source("CR01", "10.0.0.6") is None  # right AE, wrong host
    assert store.find_source("CR02", "192.168.1.1").name == "anywhere"
    assert store.find_source("PACS", "10.0.0.9") is None  # a destination only may not send to us
    assert store.find_source("NOBODY", "10.0.0.5") is None
    assert store.find_source("CR03", "127.0.0.1").name == "by-name"  # host name resolved
    assert store.find_source("CR04", "10.0.0.7").name == "room4-exact"  # exact beats wildcard
    assert store.find_source("CR04", "10.9.9.9").name == "room1-any"
    assert store.find_source("CR01", None).name == "room1"  # host not checked


# ---- instances and studies -------------------------------------------------------------------------


def test_record_instance_new_duplicate_and_new_version(store: Store) -> None:
    first = store.record_instance(instance("1.1"))
    assert first.kind == "new" and not first.reopened_study
    assert first.instance.id is not None and first.instance.study_version == 1 and first.instance.state == "received"

    again = store.record_instance(replace(instance("1.1"), path="elsewhere.dcm", received_at=T0 + timedelta(seconds=5)))
    assert again.kind == "duplicate"
    assert again.instance.id == first.instance.id and again.instance.path == first.instance.path

    changed = store.record_instance(instance("1.1", sha="b" * 64, at=T0 + timedelta(seconds=6)))
    assert changed.kind == "new_version" and changed.instance.id != first.instance.id

    assert [(i.sop_instance_uid, i.sha256[0]) for i in store.list_instances(STUDY)] == [("1.1", "a"), ("1.1", "b")]
    study = store.get_study(STUDY)
    assert (study.state, study.version, study.instance_count, study.source_ae) == ("receiving", 1, 2, "MODALITY")
    assert study.last_received_at == T0 + timedelta(seconds=6)
    assert set(study.state_times) == {"receiving"}


def test_late_instance_reopens_an_analysed_study_as_a_new_version(store: Store) -> None:
    store.record_instance(instance("1.1"))
    assert store.transition_study(STUDY, 1, ("receiving",), "stable")
    late_while_stable = store.record_instance(instance("1.2", at=T0 + timedelta(seconds=1)))
    assert not late_while_stable.reopened_study
    assert (store.get_study(STUDY).state, store.get_study(STUDY).version) == ("receiving", 1)  # back, same version

    for from_state, to_state in [("receiving", "stable"), ("stable", "queued"), ("queued", "analyzing"), ("analyzing", "analyzed")]:
        assert store.transition_study(STUDY, 1, (from_state,), to_state)
    duplicate = store.record_instance(instance("1.1"))
    assert duplicate.kind == "duplicate" and not duplicate.reopened_study
    assert store.get_study(STUDY).state == "analyzed"  # an exact duplicate does not reopen

    late = store.record_instance(instance("1.3", at=T0 + timedelta(minutes=5)))
    assert late.kind == "new" and late.reopened_study and late.instance.study_version == 2
    study = store.get_study(STUDY)
    assert (study.state, study.version, study.instance_count) == ("receiving", 2, 3)
    assert set(study.state_times) == {"receiving"}  # state times are per version
    assert [i.sop_instance_uid for i in store.list_instances(STUDY, version=1)] == ["1.1", "1.2"]
    assert [i.sop_instance_uid for i in store.list_instances(STUDY, version=2)] == ["1.3"]
    # the analysis of version 1 finishing late must not overwrite version 2's state
    assert not store.transition_study(STUDY, 1, ("analyzed",), "delivering")


def test_instance_state_and_reason(store: Store) -> None:
    recorded = store.record_instance(instance("1.1")).instance
    store.set_instance_state(recorded.id, "skipped", "lateral view (ViewPosition LL)")
    got = store.get_instance(recorded.id)
    assert (got.state, got.reason) == ("skipped", "lateral view (ViewPosition LL)")
    assert store.get_instance(recorded.id + 1000) is None
    with pytest.raises(KeyError):
        store.set_instance_state(recorded.id + 1000, "skipped", "x")
    with pytest.raises(ValueError, match="'bogus'"):
        store.set_instance_state(recorded.id, "bogus")


def test_naive_times_are_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="received_at"):
        store.record_instance(instance("1.1", at=datetime(2026, 1, 1)))


def _record_many(store: Store, worker: int, results: multiprocessing.SimpleQueue) -> None:
    kinds = []
    for n in range(50):
        kinds.append(store.record_instance(instance(f"2.{worker}.{n}", sha=f"{worker:032x}{n:032x}")).kind)
        if n % 5 == 0:  # the same 10 instances, sent by every process at once
            kinds.append(store.record_instance(instance(f"3.{n}", sha="c" * 64)).kind)
    results.put(kinds)


def test_concurrent_record_instance_from_several_processes(store: Store) -> None:
    store.ping()  # the parent holds an open connection that the forked children must not use
    context = multiprocessing.get_context("fork")  # the store object itself crosses the fork
    results = context.SimpleQueue()
    workers = [context.Process(target=_record_many, args=(store, worker, results)) for worker in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0] * 4
    kinds = Counter(kind for _ in workers for kind in results.get())
    assert kinds == {"new": 200 + 10, "duplicate": 30}
    assert len(store.list_studies()) == 1
    study = store.get_study(STUDY)
    assert study.instance_count == 210 and study.version == 1 and study.state == "receiving"
    assert len(store.list_instances(STUDY)) == 210
    assert store.transition_study(STUDY, 1, ("receiving",), "stable")  # the parent's connection still works


def test_connections_of_ended_threads_are_closed(store: Store) -> None:
    """pynetdicom serves each association in a new thread: connections must not pile up."""
    import threading

    def one_association(n: int) -> None:
        store.record_instance(instance(f"5.{n}", sha=f"{n:064x}"))

    for n in range(20):
        thread = threading.Thread(target=one_association, args=(n,))
        thread.start()
        thread.join()
    store.ping()  # this thread's connection; the ended threads' ones are closed now
    assert store._connections.open_count() <= 2
    assert store.get_study(STUDY).instance_count == 20


def test_transition_study_is_compare_and_set_with_history(store: Store) -> None:
    store.record_instance(instance("1.1"))
    assert not store.transition_study(STUDY, 2, ("receiving",), "stable")  # wrong version
    assert not store.transition_study(STUDY, 1, ("queued",), "analyzing")  # wrong state
    assert not store.transition_study("9.9.9", 1, ("receiving",), "stable")  # no such study
    assert not store.transition_study(STUDY, 1, (), "stable")
    assert store.transition_study(STUDY, 1, ("receiving", "stable"), "stable")
    assert not store.transition_study(STUDY, 1, ("receiving",), "stable")  # a second worker loses the race
    assert store.transition_study(STUDY, 1, ("stable",), "failed", error="model weights missing")
    study = store.get_study(STUDY)
    assert (study.state, study.error) == ("failed", "model weights missing")
    assert list(study.state_times) == ["receiving", "stable", "failed"]
    assert study.state_times["receiving"] <= study.state_times["stable"] <= study.state_times["failed"]
    assert store.transition_study(STUDY, 1, ("failed",), "queued")  # a re-run clears the error
    assert store.get_study(STUDY).error is None
    with pytest.raises(ValueError, match="'finished'"):
        store.transition_study(STUDY, 1, ("queued",), "finished")


def test_list_studies_newest_first_and_by_state(store: Store) -> None:
    for n in range(3):
        store.record_instance(instance(f"4.{n}", study=f"{STUDY}.{n}"))
    for n in range(3, 1203):  # more studies than one IN (...) list may bind on SQLite
        store.record_instance(instance(f"4.{n}", study=f"{STUDY}.{n}", sha=f"{n:064x}"))
    store.transition_study(f"{STUDY}.1", 1, ("receiving",), "stable")
    newest_first = store.list_studies(limit=5000)
    assert [s.study_instance_uid for s in newest_first[-3:]] == [f"{STUDY}.2", f"{STUDY}.1", f"{STUDY}.0"]
    assert len(newest_first) == 1203 and all(set(s.state_times) >= {"receiving"} for s in newest_first)
    assert [s.study_instance_uid for s in store.list_studies(states=("stable",))] == [f"{STUDY}.1"]
    assert len(store.list_studies(limit=2)) == 2
    assert store.get_study("no.such.study") is None


# ---- analyses, produced objects, deliveries, audit ---------------------------------------------------


def test_analyses_upsert_is_idempotent(store: Store) -> None:
    store.record_instance(instance("1.1"))
    record = AnalysisRecord(STUDY, 1, "1.1", "failed", None, "CUDA out of memory", T0)
    store.save_analysis(record)
    store.save_analysis(replace(record, status="analyzed", result_json='{"report": "ok"}', error=None))
    store.save_analysis(replace(record, status="analyzed", result_json='{"report": "ok"}', error=None))
    assert store.list_analyses(STUDY, 1) == [AnalysisRecord(STUDY, 1, "1.1", "analyzed", '{"report": "ok"}', None, T0)]
    assert store.list_analyses(STUDY, 2) == []


def test_produced_objects_are_recorded_once(store: Store) -> None:
    store.record_instance(instance("1.1"))
    obj = ProducedObject(STUDY, 1, "1.1", "sr", "1.2.826.0.1.3680043.10.1431.5.1", "1.2.840.10008.5.1.4.1.1.88.33", "results/sr.dcm", T0)
    store.record_produced_object(obj)
    store.record_produced_object(replace(obj, path="results/other.dcm", created_at=T0 + timedelta(hours=1)))
    assert store.list_produced_objects(STUDY) == [obj]
    assert store.list_produced_objects(STUDY, version=1) == [obj]
    assert store.list_produced_objects(STUDY, version=2) == []


def test_deliveries_upsert_one_row_per_destination_and_object(store: Store) -> None:
    store.record_instance(instance("1.1"))
    pending = DeliveryRecord(STUDY, 1, "pacs", "5.1", "pending", 0, None, None, T0)
    store.upsert_delivery(pending)
    store.upsert_delivery(replace(pending, destination="viewer"))
    store.upsert_delivery(replace(pending, status="retrying", attempts=1, last_status=0xA700, error="out of resources", updated_at=T0 + timedelta(seconds=2)))
    store.upsert_delivery(replace(pending, status="sent", attempts=2, last_status=0, updated_at=T0 + timedelta(seconds=9)))
    rows = store.list_deliveries(STUDY)
    assert [(r.destination, r.status, r.attempts, r.last_status) for r in rows] == [("viewer", "pending", 0, None), ("pacs", "sent", 2, 0)]
    assert [r.destination for r in store.list_deliveries(statuses=("pending", "retrying"))] == ["viewer"]
    assert store.list_deliveries("other.study") == []
    with pytest.raises(ValueError, match="'lost'"):
        store.upsert_delivery(replace(pending, status="lost"))


# ---- retention ------------------------------------------------------------------------------------


def _finished_study(store: Store) -> None:
    """A study with two instances, an analysis, a produced object and a delivery, moved to done."""
    store.record_instance(instance("1.1"))
    store.record_instance(instance("1.2", sha="b" * 64))
    store.save_analysis(AnalysisRecord(STUDY, 1, "1.1", "analyzed", "{}", None, T0))
    store.record_produced_object(ProducedObject(STUDY, 1, "1.1", "sr", "5.1", "1.2.840.10008.5.1.4.1.1.88.34", f"{STUDY}/v1/sr.dcm", T0))
    store.upsert_delivery(DeliveryRecord(STUDY, 1, "pacs", "5.1", "sent", 1, 0, None, T0))
    for to_state in ("stable", "queued", "analyzing", "analyzed", "delivering", "done"):
        assert store.transition_study(STUDY, 1, tuple(STUDY_STATES), to_state)


def test_purge_removes_a_finished_study_and_keeps_a_tombstone(store: Store) -> None:
    _finished_study(store)
    later = datetime.now(UTC) + timedelta(seconds=1)
    assert store.list_purge_candidates(("done",), later) == [STUDY]
    assert store.list_purge_candidates(("failed",), later) == []
    assert store.list_purge_candidates(("done",), later - timedelta(days=1)) == []
    removed: list[tuple[list[str], list[str]]] = []
    purged = store.purge_study(STUDY, ("done",), later, lambda instances, produced: removed.append((sorted(instances), produced)))
    assert purged is not None and (purged.instances, purged.produced_objects, purged.bytes, purged.version) == (2, 1, 2468, 1)
    assert removed == [(sorted(i.path for i in (instance("1.1"), instance("1.2", sha="b" * 64))), [f"{STUDY}/v1/sr.dcm"])]
    assert store.list_instances(STUDY) == []
    assert store.list_analyses(STUDY, 1) == [] and store.list_produced_objects(STUDY) == [] and store.list_deliveries(STUDY) == []
    study = store.get_study(STUDY)
    assert study is not None and study.state == "purged" and study.instance_count == 0 and "purged" in study.state_times
    assert store.list_purge_candidates(("done",), later) == []
    # A late instance reopens the tombstone as a new analysis version.
    outcome = store.record_instance(instance("1.3", sha="c" * 64))
    assert outcome.kind == "new" and outcome.reopened_study and outcome.instance.study_version == 2
    assert store.get_study(STUDY).state == "receiving"


def test_purge_leaves_studies_that_are_not_eligible(store: Store) -> None:
    _finished_study(store)
    later = datetime.now(UTC) + timedelta(seconds=1)
    calls: list[object] = []
    assert store.purge_study(STUDY, ("done",), later - timedelta(days=1), calls.append) is None  # changed too recently
    assert store.purge_study(STUDY, ("failed",), later, calls.append) is None  # not in a purgeable state
    assert store.purge_study("1.2.3.999", ("done",), later, calls.append) is None  # unknown study
    assert calls == [] and len(store.list_instances(STUDY)) == 2 and store.get_study(STUDY).state == "done"


def test_an_instance_arriving_during_a_purge_waits_and_reopens_the_study(store: Store, store_url: str) -> None:
    """The file callback runs under the study's lock: a concurrent record_instance (another
    connection, as in an SCP process) is committed only after the purge, as a new version."""
    import threading

    _finished_study(store)
    other = open_store(store_url, migrate=False)
    recorded: list = []
    in_callback = threading.Event()

    def slow_removal(instances: list[str], produced: list[str]) -> None:
        in_callback.set()
        threading.Event().wait(0.5)
        recorded.append(("callback done", list(recorded)))

    def late_sender() -> None:
        in_callback.wait(10)
        recorded.append(other.record_instance(instance("1.9", sha="d" * 64)))

    sender = threading.Thread(target=late_sender)
    sender.start()
    try:
        purged = store.purge_study(STUDY, ("done",), datetime.now(UTC) + timedelta(seconds=1), slow_removal)
        sender.join(30)
    finally:
        other.close()
    assert purged is not None
    assert recorded[0] == ("callback done", [])  # the late instance was not recorded while files were removed
    late = recorded[1]
    assert late.kind == "new" and late.reopened_study and late.instance.study_version == 2
    assert [i.sop_instance_uid for i in store.list_instances(STUDY)] == ["1.9"]


def test_audit_events_newest_first_with_detail(store: Store) -> None:
    store.audit(AuditEvent(T0, "association.rejected", "EVIL", "ANATOMIX", "10.1.1.1", None, None, {"reason": "calling AE not recognised"}))
    store.audit(AuditEvent(T0 + timedelta(seconds=1), "instance.received", "CR01", "ANATOMIX", "10.0.0.5", STUDY, "1.1", {"bytes": 1234}))
    events = store.list_audit_events()
    assert [e.event for e in events] == ["instance.received", "association.rejected"]
    assert events[0].detail == {"bytes": 1234} and events[0].at == T0 + timedelta(seconds=1) and events[0].id is not None
    assert [e.calling_ae for e in store.list_audit_events("association.rejected")] == ["EVIL"]
    assert len(store.list_audit_events(limit=1)) == 1


# ---- failures --------------------------------------------------------------------------------------


def test_unreachable_postgres_is_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable, match="cannot connect to PostgreSQL"):
        open_store(f"postgresql://postgres:secret@127.0.0.1:{free_port()}/anatomix")


def test_unreachable_postgres_message_hides_the_password() -> None:
    with pytest.raises(StoreUnavailable) as caught:
        open_store(f"postgresql://postgres:secret@127.0.0.1:{free_port()}/anatomix")
    assert "secret" not in str(caught.value) and "***" in str(caught.value)


def test_postgres_going_away_is_store_unavailable_then_recovers(postgres_url: str, postgres_server) -> None:
    store = open_store(postgres_url)
    store.ping()
    with psycopg.connect(postgres_server.url("postgres"), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'anatomix-node'")
    with pytest.raises(StoreUnavailable):
        store.ping()
    store.ping()  # the broken connection was dropped; the next call reconnects
    store.close()


def test_unopenable_sqlite_file_is_store_unavailable(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(StoreUnavailable, match="cannot open the SQLite database"):
        open_store(f"sqlite:///{tmp_path / 'a-file' / 'anatomix.db'}")


def test_bad_database_urls_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="use sqlite:///PATH or postgresql://"):
        open_store("mysql://127.0.0.1/anatomix")
    with pytest.raises(StoreError, match="name a file"):
        open_store("sqlite:///:memory:")


def test_sqlite_durability_mode_from_the_url(tmp_path: Path) -> None:
    import sqlite3

    default = open_store(f"sqlite:///{tmp_path / 'a.db'}")
    relaxed = open_store(f"sqlite:///{tmp_path / 'b.db'}?synchronous=normal")
    assert relaxed.record_instance(instance("1.1")).kind == "new"
    # PRAGMA synchronous: 2 = FULL, 1 = NORMAL; journal_mode is a property of the file
    assert default._connections.get().execute("PRAGMA synchronous").fetchone()[0] == 2
    assert relaxed._connections.get().execute("PRAGMA synchronous").fetchone()[0] == 1
    assert sqlite3.connect(tmp_path / "b.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert (tmp_path / "b.db").exists() and not (tmp_path / "b.db?synchronous=normal").exists()
    default.close()
    relaxed.close()
    with pytest.raises(StoreError, match=r"\?synchronous=normal"):
        open_store(f"sqlite:///{tmp_path / 'c.db'}?sync=off")


def test_private_postgres_server_can_be_started(tmp_path: Path) -> None:
    """The fallback used where no PostgreSQL runs: initdb + pg_ctl on a free port."""
    server = start_private_server(tmp_path / "pg")
    try:
        url = server.create_database()
        store = open_store(url)
        assert store.record_instance(instance("1.1")).kind == "new"
        store.close()
    finally:
        server.stop()
