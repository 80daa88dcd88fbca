"""Destination health (migration 0009), on SQLite and PostgreSQL: last success and last failure with
its reason, objects waiting and given up over current study versions, the next try."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from dicom_node.store.base import STUDY_STATES, DeliveryRecord, DestinationHealth, Store
from tests.dicom_node.test_store import STUDY, T0, instance, store, store_url  # noqa: F401 (fixtures)
from tests.support.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)


def _delivery(sop: str, dest: str, status: str, version: int = 1, next_at=None) -> DeliveryRecord:
    return DeliveryRecord(STUDY, version, dest, sop, status, 2, None, "no association", T0, T0, next_at)


def test_attempts_and_current_deliveries_make_each_destinations_health(store: Store) -> None:
    assert store.list_destination_health() == []
    store.record_instance(instance("1.1"))
    for to_state in ("stable", "queued", "analyzing", "analyzed", "delivering"):
        assert store.transition_study(STUDY, 1, tuple(STUDY_STATES), to_state)
    soon = T0 + timedelta(seconds=40)
    store.upsert_delivery(_delivery("2.1", "pacs", "retrying", next_at=soon + timedelta(seconds=20)))
    store.upsert_delivery(_delivery("2.2", "pacs", "retrying", next_at=soon))
    store.upsert_delivery(_delivery("2.3", "pacs", "dead"))
    store.upsert_delivery(_delivery("2.4", "archive", "sent"))
    store.upsert_delivery(_delivery("2.5", "archive", "failed"))
    store.upsert_delivery(_delivery("2.1", "old", "retrying", version=7, next_at=soon))  # not the current version: not counted
    store.record_destination_attempt("pacs", T0, stored=False, failure="no association with pacs: connection refused")
    store.record_destination_attempt("archive", T0, stored=True, failure=None)
    store.record_destination_attempt("archive", T0 + timedelta(seconds=1), stored=True, failure="C-STORE status 0xA900")
    store.record_destination_attempt("idle", T0, stored=False, failure=None)  # nothing happened: nothing recorded
    health = {h.destination: h for h in store.list_destination_health()}
    assert sorted(health) == ["archive", "pacs"]  # "old" has neither attempts nor current deliveries
    assert health["pacs"] == DestinationHealth("pacs", None, T0, "no association with pacs: connection refused", 2, 1, soon)
    assert (health["pacs"].failing, health["pacs"].state) == (True, "down")
    archive = health["archive"]
    assert (archive.last_success_at, archive.last_failure_at, archive.last_failure_reason) == (T0 + timedelta(seconds=1),) * 2 + ("C-STORE status 0xA900",)
    assert (archive.waiting, archive.given_up, archive.next_attempt_at, archive.state) == (0, 1, None, "failing")
    # A later success keeps the last failure and its reason, and the destination is ok again.
    store.record_destination_attempt("pacs", T0 + timedelta(minutes=5), stored=True, failure=None)
    pacs = next(h for h in store.list_destination_health() if h.destination == "pacs")
    assert (pacs.last_success_at, pacs.last_failure_at, pacs.last_failure_reason) == (
        T0 + timedelta(minutes=5), T0, "no association with pacs: connection refused")  # fmt: skip
    assert (pacs.failing, pacs.state) == (False, "ok")


def test_a_resend_does_not_count_as_a_second_done_on_the_dashboard(store: Store) -> None:
    from tests.dicom_node.test_store import _finished_study

    since = datetime.now(UTC) - timedelta(minutes=5)
    _finished_study(store)
    assert store.transition_study(STUDY, 1, ("done",), "delivering")  # a resend: delivering and done again
    assert store.transition_study(STUDY, 1, ("delivering",), "done")
    assert [s for s, _ in store.get_study(STUDY).history].count("done") == 2  # the history keeps both
    entries = store.state_entries_since(since)
    assert [s for s, _ in entries].count("done") == 1 and [s for s, _ in entries].count("delivering") == 1


def test_done_studies_whose_results_went_nowhere_are_counted(store: Store) -> None:
    from dicom_node.pipeline.routing import NO_DESTINATION_NOTE

    assert store.count_undelivered_studies() == 0
    store.record_instance(instance("1.1"))
    for to_state in ("stable", "queued", "analyzing", "analyzed", "delivering"):
        assert store.transition_study(STUDY, 1, tuple(STUDY_STATES), to_state)
    assert store.transition_study(STUDY, 1, ("delivering",), "done", error="1 failed (bad pixels); " + NO_DESTINATION_NOTE)
    assert store.count_undelivered_studies() == 1
    assert store.transition_study(STUDY, 1, ("done",), "delivering")
    assert store.transition_study(STUDY, 1, ("delivering",), "done", error=None)  # resent once a destination was set
    assert store.count_undelivered_studies() == 0
