"""Per-destination delivery state with a real store (SQLite and PostgreSQL) and real peers: one
destination down does not hold back or fail another; capped backoff within a retry window, then
dead letters; the failure text says each reason once; a not-yet-due destination is not retried early."""

from __future__ import annotations

import random
import threading
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from pydicom.uid import generate_uid

from dicom_node.cli.main import main
from dicom_node.pipeline.delivery import deliver_study_version, destination_states
from dicom_node.pipeline.tasks import finish_delivery
from dicom_node.settings import Settings
from dicom_node.store import open_store
from dicom_node.store.base import RemoteNode
from tests.integration.test_delivery import seed_study, to_comprehensive
from tests.support.net import free_port
from tests.support.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)
from tests.support.receivers import StorageReceiver
from tests.support.stores import store_url  # noqa: F401 (fixtures)


def site_settings(tmp_path: Path, store_url: str, **delivery: object) -> Settings:
    values = {"backoff_base_s": 10.0, "backoff_max_s": 60.0, "retry_window_s": 300.0, **delivery}
    return Settings().with_overrides(storage={"data_dir": tmp_path / "data"}, database={"url": store_url}, delivery=values)


def test_one_destination_down_the_other_gets_everything_then_the_window_dead_letters(tmp_path, store_url, capsys):
    settings = site_settings(tmp_path, store_url)
    store = open_store(settings.database_url)
    up = StorageReceiver("127.0.0.1", "UP")
    store.add_remote_node(RemoteNode("pacs-up", "UP", "127.0.0.1", up.port, role="destination", profile="sr-only", default_destination=True))
    store.add_remote_node(RemoteNode("pacs-down", "DOWN", "127.0.0.1", free_port(), role="destination", profile="sr-only", default_destination=True))
    study_uid = generate_uid()
    objects = seed_study(store, settings, study_uid, 3)
    rng = random.Random(7)
    try:
        study = store.get_study(study_uid)
        first = deliver_study_version(store, settings, study, fallback=to_comprehensive, rng=rng)
        by_name = {d.name: d for d in first.destinations}
        assert (by_name["pacs-up"].sent, by_name["pacs-up"].complete) == (3, True)
        assert (by_name["pacs-down"].retrying, by_name["pacs-down"].attempts) == (3, 1)
        assert not first.finished and first.errors == []  # nothing has failed yet: one destination is pending
        assert sorted(up.sop_instance_uids()) == sorted(o.sop_instance_uid for o in objects)
        rows = {(r.destination, r.status) for r in store.list_deliveries(study_uid)}
        assert rows == {("pacs-up", "sent"), ("pacs-down", "retrying")}
        [down] = [r for r in store.list_deliveries(study_uid) if r.destination == "pacs-down"][:1]
        assert 5.0 <= (down.next_attempt_at - down.first_attempt_at).total_seconds() <= 10.0  # backoff step 1: 10 s, jittered

        # A duplicate task before the next try is due sends nothing and counts no attempt.
        early = deliver_study_version(store, settings, study, fallback=to_comprehensive, now=down.first_attempt_at + timedelta(seconds=1))
        assert not early.finished and 0 < early.next_attempt_in <= 10.0
        assert {r.attempts for r in store.list_deliveries(study_uid) if r.destination == "pacs-down"} == {1}
        assert len(up.sop_instance_uids()) == 3  # the complete destination is not sent to again

        # `studies` view: which destination is pending and when its next try is.
        states = {s.name: s for s in destination_states(store, settings, store.get_study(study_uid))}
        assert states["pacs-down"].next_attempt_at == down.next_attempt_at and states["pacs-down"].retrying == 3
        assert "pacs-down: 0/3 sent, 3 retrying (attempt 1, next try" in states["pacs-down"].describe()
        assert states["pacs-up"].describe() == "pacs-up: 3/3 sent"
        config = tmp_path / "anatomix-node.toml"
        config.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n[database]\nurl = "{store_url}"\n')
        assert main(["studies", "--config", str(config)]) == 0
        printed = capsys.readouterr().out
        when = down.next_attempt_at.strftime("%H:%M:%S UTC")
        assert f"{study_uid}: delivery pending: pacs-down: 0/3 sent, 3 retrying (attempt 1, next try {when})" in printed

        second = deliver_study_version(store, settings, study, fallback=to_comprehensive, now=down.next_attempt_at, rng=rng)
        assert not second.finished
        assert {r.attempts for r in store.list_deliveries(study_uid) if r.destination == "pacs-down"} == {2}

        # Past the retry window (measured from the first attempt): dead-lettered, each reason once.
        last = deliver_study_version(store, settings, study, fallback=to_comprehensive,
                                     now=down.first_attempt_at + timedelta(seconds=301), rng=rng)  # fmt: skip
        assert last.finished and (last.sent, last.dead, last.failed) == (3, 3, 0)
        [error] = last.errors
        assert error.startswith("pacs-down: 0/3 sent, 3 dead-lettered: dead-lettered after 3 attempts in 5.0 min")
        assert error.count("no association") == 1
        assert finish_delivery(store, study, last) == "done"  # the other destination got everything
        final = store.get_study(study_uid)
        assert final.state == "done"
        assert final.error.startswith("delivered to pacs-up; not to pacs-down: pacs-down: 0/3 sent, 3 dead-lettered")
        assert final.error.count("no association") == 1
    finally:
        up.stop()
        store.close()


def test_no_destination_got_everything_fails_the_study(tmp_path, store_url):
    settings = site_settings(tmp_path, store_url, max_attempts=1)
    store = open_store(settings.database_url)
    store.add_remote_node(RemoteNode("pacs-down", "DOWN", "127.0.0.1", free_port(), role="destination", profile="sr-only", default_destination=True))
    study_uid = generate_uid()
    seed_study(store, settings, study_uid, 2)
    try:
        study = store.get_study(study_uid)
        summary = deliver_study_version(store, settings, study, fallback=to_comprehensive)
        assert summary.finished and summary.dead == 2
        assert finish_delivery(store, study, summary) == "failed"
        error = store.get_study(study_uid).error
        assert error.startswith("not delivered to pacs-down: pacs-down: 0/2 sent, 2 dead-lettered: dead-lettered after 1 attempts")
        assert error.count("no association") == 1
    finally:
        store.close()


def test_backoff_is_capped_and_the_window_default_is_a_day():
    assert Settings().delivery.retry_window_s >= 24 * 3600
    policy = replace(Settings().delivery, backoff_base_s=2.0, backoff_max_s=300.0)
    from dicom_node.pipeline.delivery import backoff_delay

    assert max(backoff_delay(40, policy, random.Random(i)) for i in range(20)) <= 300.0
    # A day of an unreachable destination stays within the attempt cap: the window, not the count, ends it.
    total, attempt = 0.0, 0
    while total < 24 * 3600:
        attempt += 1
        total += backoff_delay(attempt, policy, random.Random(attempt))
    assert attempt < Settings().delivery.max_attempts


class HoldingReceiver(StorageReceiver):
    """Holds its first C-STORE until released, so a second task can try while the first is mid-send."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        super().__init__("127.0.0.1", "HOLDING")

    def _on_store(self, event):
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(60)
        return super()._on_store(event)


def test_a_duplicate_task_does_not_make_the_same_attempt(tmp_path, store_url):
    settings = site_settings(tmp_path, store_url)
    store = open_store(settings.database_url)
    pacs = HoldingReceiver()
    store.add_remote_node(RemoteNode("pacs", "HOLDING", "127.0.0.1", pacs.port, role="destination", profile="sr-only", default_destination=True))
    study_uid = generate_uid()
    objects = seed_study(store, settings, study_uid, 2)
    study = store.get_study(study_uid)
    results: list = []
    first = threading.Thread(target=lambda: results.append(deliver_study_version(store, settings, study, fallback=to_comprehensive)))
    try:
        first.start()
        assert pacs.entered.wait(30)  # the first task is inside its C-STORE now
        duplicate = deliver_study_version(store, settings, study, fallback=to_comprehensive)
        assert not duplicate.finished and duplicate.sent == 0  # it saw the attempt taken and sent nothing
        pacs.release.set()
        first.join(60)
        [done] = results
        assert done.finished and done.sent == 2
        assert sorted(pacs.sop_instance_uids()) == sorted(o.sop_instance_uid for o in objects)  # once each
        assert {(r.status, r.attempts) for r in store.list_deliveries(study_uid)} == {("sent", 1)}
    finally:
        pacs.release.set()
        first.join(60)
        pacs.stop()
        store.close()


def test_the_analysis_note_is_kept_and_a_second_delivery_replaces_the_first_ones_text(tmp_path, store_url):
    settings = site_settings(tmp_path, store_url, max_attempts=1)
    store = open_store(settings.database_url)
    store.add_remote_node(RemoteNode("pacs-down", "DOWN", "127.0.0.1", free_port(), role="destination", profile="sr-only", default_destination=True))
    study_uid = generate_uid()
    seed_study(store, settings, study_uid, 1)
    note = "1 analysed, 1 failed (pixel data cannot be decoded)"
    try:
        assert store.transition_study(study_uid, 1, ("delivering",), "delivering", error=note)
        for _ in range(2):  # the first delivery, then a resend that fails the same way
            study = store.get_study(study_uid)
            summary = deliver_study_version(store, settings, study, fallback=to_comprehensive, resend=True)
            assert finish_delivery(store, study, summary) == "failed"
            error = store.get_study(study_uid).error
            assert error.startswith(note + "; not delivered to pacs-down: ") and error.count(note) == 1, error
            assert error.count("no association") == 1
            assert store.transition_study(study_uid, 1, ("failed",), "delivering", error=error)
    finally:
        store.close()
