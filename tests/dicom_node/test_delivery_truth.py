"""Issue 21 in pure functions and one store: where results go (init, serve, ae add), the study's
"undelivered" outcome, the delivery stage timed by the real pass, the destination gauges."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from dicom_node.api.metrics import StoreCollector, stage_durations
from dicom_node.ops.remotes import unreached_destination_warning, where_results_go
from dicom_node.ops.studies import select_studies, study_outcome
from dicom_node.pipeline.delivery import DeliveryRound
from dicom_node.pipeline.routing import NO_DESTINATION_NOTE
from dicom_node.pipeline.tasks import finish_delivery
from dicom_node.settings import load_settings
from dicom_node.store.base import STUDY_STATES, RemoteNode, RoutingRuleRecord, Store, StudyRecord
from tests.dicom_node.test_store import STUDY, instance, store, store_url  # noqa: F401 (fixtures)
from tests.support.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)

T0 = datetime(2026, 12, 1, 9, 0, 0, tzinfo=UTC)
SOURCE = RemoteNode("ward", "WARD", "10.0.0.9", 104, role="source")
PACS = RemoteNode("pacs", "PACS", "10.0.0.2", 104, role="destination")


def rule(name: str, destinations: list[str], enabled: bool = True) -> RoutingRuleRecord:
    return RoutingRuleRecord(name, 1, {"modality": ["CR"]}, {"destinations": destinations, "profile": None, "send_to_sender": False},
                             enabled=enabled)  # fmt: skip


def test_where_results_go_says_nowhere_and_how_to_fix_it() -> None:
    lines, nowhere = where_results_go([SOURCE], [])
    assert lines == [] and nowhere is not None and "no destination is configured" in nowhere and "--default-destination" in nowhere
    lines, nowhere = where_results_go([SOURCE, PACS], [rule("cr", ["pacs"], enabled=False)])
    assert lines == [] and "pacs is a destination but not a default one" in nowhere and "ae update pacs --default-destination" in nowhere
    default = RemoteNode("pacs", "PACS", "10.0.0.2", 104, role="destination", default_destination=True)
    lines, nowhere = where_results_go([SOURCE, default], [])
    assert nowhere is None and lines == ["pacs (PACS@10.0.0.2:104, profile full): every study's results (default destination)"]
    lines, nowhere = where_results_go([SOURCE, PACS], [rule("cr", ["pacs", "gone"])])
    assert nowhere is None and lines == ["routing rule cr: the studies it matches go to pacs"]


def test_ae_add_warns_about_a_destination_nothing_sends_to() -> None:
    warning = unreached_destination_warning(PACS, [])
    assert warning is not None and warning.startswith("pacs is a destination but will receive no results")
    assert unreached_destination_warning(PACS, [rule("cr", ["pacs"])]) is None
    assert unreached_destination_warning(PACS, [rule("cr", ["pacs"], enabled=False)]) is not None
    assert unreached_destination_warning(RemoteNode("pacs", "PACS", "h", 104, role="destination", default_destination=True), []) is None
    assert unreached_destination_warning(RemoteNode("ris", "RIS", "h", 104, role="both"), []) is None  # gets back what it sends
    assert unreached_destination_warning(SOURCE, []) is None


def test_the_delivery_stage_is_the_last_real_pass() -> None:
    history = [("receiving", T0), ("stable", T0 + timedelta(seconds=2)), ("analyzing", T0 + timedelta(seconds=3)),
               ("analyzed", T0 + timedelta(seconds=13)), ("delivering", T0 + timedelta(seconds=13.1)),
               ("done", T0 + timedelta(seconds=13.11)),  # the no-destination pass
               ("delivering", T0 + timedelta(seconds=600)), ("done", T0 + timedelta(seconds=602.9))]  # the resend that delivered  # fmt: skip
    stages = stage_durations(history)
    assert abs(stages["delivery"] - 2.9) < 1e-6 and stages["analysis"] == 10.0
    assert "delivery" not in stage_durations(history[:6], delivered=False)  # nothing was sent: not a delivery time


def _undelivered_study(store: Store) -> StudyRecord:
    store.record_instance(instance("1.1"))
    for to_state in ("stable", "queued", "analyzing", "analyzed", "delivering"):
        assert store.transition_study(STUDY, 1, tuple(STUDY_STATES), to_state)
    study = store.get_study(STUDY)
    assert study is not None
    return study


def test_no_destination_ends_done_flagged_undelivered_with_a_warning(store: Store, caplog) -> None:
    study = _undelivered_study(store)
    with caplog.at_level(logging.WARNING, logger="dicom_node.pipeline.tasks"):
        assert finish_delivery(store, study, DeliveryRound()) == "done"
    done = store.get_study(STUDY)
    assert done.state == "done" and done.error == NO_DESTINATION_NOTE and study_outcome(done) == "undelivered"
    assert [r.levelname for r in caplog.records] == ["WARNING"] and f"study {STUDY} v1 undelivered" in caplog.text
    # `resend --undelivered` (and the console's "Resend all undelivered") picks it up once a destination is set.
    assert [s.study_instance_uid for s in select_studies(store, None, None, None, undelivered=True)] == [STUDY]


def test_destination_gauges_and_the_undelivered_count(store: Store, tmp_path) -> None:
    study = _undelivered_study(store)
    finish_delivery(store, study, DeliveryRound())
    store.add_remote_node(PACS)
    store.add_remote_node(RemoteNode("archive", "ARCH", "10.0.0.3", 104, role="destination", default_destination=True))
    store.record_destination_attempt("pacs", T0, stored=False, failure="no association with pacs")
    (tmp_path / "anatomix-node.toml").write_text(f'[storage]\ndata_dir = "{tmp_path}"\n')
    settings = load_settings(tmp_path / "anatomix-node.toml", env={})
    families = {f.name: f for f in StoreCollector(settings, store).collect()}
    samples = {(f.name, s.labels.get("destination")): s.value for f in families.values() for s in f.samples}
    assert samples[("anatomix_destination_up", "pacs")] == 0 and samples[("anatomix_destination_up", "archive")] == 1
    assert samples[("anatomix_destination_waiting_objects", "pacs")] == 0
    assert samples[("anatomix_destination_last_failure_timestamp_seconds", "pacs")] == T0.timestamp()
    assert ("anatomix_destination_last_success_timestamp_seconds", "pacs") not in samples  # never: no sample
    assert samples[("anatomix_studies_undelivered", None)] == 1
