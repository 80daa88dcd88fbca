"""Store parts of delivery and reprocessing, on SQLite and PostgreSQL (migration 0002): the sender
node kept on the study, per-destination retry times, the append-only history, requeue for
reanalysis, and no purge of results a destination never got."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from dicom_node.store.base import STUDY_STATES, AnalysisRecord, DeliveryRecord, Store
from tests.dicom_node.test_store import STUDY, T0, _finished_study, instance, store, store_url  # noqa: F401 (fixtures)
from tests.support.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)


def test_the_sending_node_is_kept_on_the_study_and_a_new_version_takes_its_sender(store: Store) -> None:
    store.record_instance(instance("1.1"), source_node="ward-b", source_host="127.0.0.2")
    store.record_instance(instance("1.2", sha="b" * 64), source_node="ward-a", source_host="127.0.0.1")  # same version
    study = store.get_study(STUDY)
    assert (study.source_node, study.source_host, study.version) == ("ward-b", "127.0.0.2", 1)
    for to_state in ("stable", "queued", "analyzing", "analyzed", "delivering", "done"):
        assert store.transition_study(STUDY, 1, tuple(STUDY_STATES), to_state)
    store.record_instance(instance("1.3", sha="c" * 64), source_node="ward-a", source_host="127.0.0.1")  # reopens: v2
    study = store.get_study(STUDY)
    assert (study.source_node, study.source_host, study.version) == ("ward-a", "127.0.0.1", 2)


def test_unknown_sender_then_a_known_one(store: Store) -> None:
    store.record_instance(instance("1.1"))  # e.g. recovered from the spool: sender unknown
    assert (store.get_study(STUDY).source_node, store.get_study(STUDY).source_host) == (None, None)
    store.record_instance(instance("1.2", sha="b" * 64), source_node="ward-a", source_host="127.0.0.1")
    assert store.get_study(STUDY).source_node == "ward-a"


def test_history_is_append_only_across_a_resend(store: Store) -> None:
    _finished_study(store)
    first = store.get_study(STUDY).history
    assert [s for s, _ in first] == ["receiving", "stable", "queued", "analyzing", "analyzed", "delivering", "done"]
    assert store.transition_study(STUDY, 1, ("done",), "delivering")
    assert store.transition_study(STUDY, 1, ("delivering",), "done")
    history = store.get_study(STUDY).history
    assert history[: len(first)] == first and [s for s, _ in history[len(first) :]] == ["delivering", "done"]
    assert [at for _, at in history] == sorted(at for _, at in history)


def test_delivery_retry_times_round_trip(store: Store) -> None:
    store.record_instance(instance("1.1"))
    first, next_at = T0, T0 + timedelta(seconds=37.5)
    store.upsert_delivery(DeliveryRecord(STUDY, 1, "pacs", "5.1", "retrying", 2, None, "no association", T0, first, next_at))
    [row] = store.list_deliveries(STUDY)
    assert (row.first_attempt_at, row.next_attempt_at) == (first, next_at)
    store.upsert_delivery(DeliveryRecord(STUDY, 1, "pacs", "5.1", "sent", 3, 0, None, T0, first, None))
    [row] = store.list_deliveries(STUDY)
    assert (row.status, row.first_attempt_at, row.next_attempt_at) == ("sent", first, None)


def test_requeue_for_analysis_same_version_and_new_version(store: Store) -> None:
    store.record_instance(instance("1.1"))
    store.record_instance(instance("1.2", sha="b" * 64))
    [one, two] = store.list_instances(STUDY)
    store.set_instance_state(one.id, "selected", "frontal chest")
    store.set_instance_state(two.id, "failed", "pixel data cannot be decoded")
    store.save_analysis(AnalysisRecord(STUDY, 1, "1.2", "failed", None, "pixel data cannot be decoded", T0))
    assert store.transition_study(STUDY, 1, ("receiving",), "failed", error="no model configured")
    assert store.requeue_for_analysis(STUDY, 1, ("queued",), new_version=False) is None  # wrong state: nothing changes
    assert store.requeue_for_analysis(STUDY, 2, ("failed",), new_version=False) is None  # wrong version
    assert store.requeue_for_analysis(STUDY, 1, ("done", "failed"), new_version=False) == 1
    study = store.get_study(STUDY)
    assert (study.state, study.version, study.error) == ("queued", 1, None)
    assert {i.state for i in store.list_instances(STUDY, 1)} == {"selected"}
    assert store.list_analyses(STUDY, 1) == []  # the failed analysis runs again
    for to_state in ("analyzing", "analyzed", "delivering", "done"):
        assert store.transition_study(STUDY, 1, tuple(STUDY_STATES), to_state)
    assert store.requeue_for_analysis(STUDY, 1, ("done", "failed"), new_version=True) == 2
    study = store.get_study(STUDY)
    assert (study.state, study.version) == ("queued", 2)
    assert len(store.list_instances(STUDY, 2)) == 2 and store.list_instances(STUDY, 1) == []
    assert [s for s, _ in study.history] == ["queued"]  # the new version's own history


def test_a_done_study_with_a_dead_letter_is_purged_only_with_the_failed_ones(store: Store) -> None:
    _finished_study(store)
    store.upsert_delivery(DeliveryRecord(STUDY, 1, "pacs-down", "5.1", "dead", 9, None, "dead-lettered", T0))
    later = datetime.now(UTC) + timedelta(seconds=1)
    assert store.list_purge_candidates(("done",), later) == []
    assert store.purge_study(STUDY, ("done",), later, lambda *_: None) is None
    assert store.list_purge_candidates(("done", "failed"), later) == [STUDY]
    assert store.purge_study(STUDY, ("done", "failed"), later, lambda *_: None) is not None
