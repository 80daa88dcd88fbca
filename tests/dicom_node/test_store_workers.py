"""Worker reports and the per-source TLS columns of migration 0008, on SQLite and PostgreSQL."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from dicom_node.store.base import RemoteNode, Store, WorkerReport
from tests.support.postgres import postgres_server, postgres_url, start_private_server  # noqa: F401 (fixtures)
from tests.support.stores import store, store_url  # noqa: F401 (fixtures)

T0 = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)


def test_worker_reports_are_upserted_listed_newest_first_and_forgotten_when_old(store: Store) -> None:
    loaded = WorkerReport("analyze-1@gpu1/77", "gpu1", 77, ("analyze",), True, T0, T0, model_name="anatomix", model_version="1",
                          model_digest="ab" * 32, demo_weights=True, device="cpu", load_seconds=2.5)  # fmt: skip
    failed = WorkerReport("analyze-2@gpu2/78", "gpu2", 78, ("analyze", "deliver"), False, T0, T0 + timedelta(seconds=5),
                          error="RuntimeError: bad checkpoint")  # fmt: skip
    store.record_worker_report(loaded)
    store.record_worker_report(failed)
    assert store.list_worker_reports() == [failed, loaded]
    seen_again = replace(loaded, last_seen_at=T0 + timedelta(seconds=30))
    store.record_worker_report(seen_again)
    assert store.list_worker_reports() == [seen_again, failed]
    assert store.remove_worker_reports(T0 + timedelta(seconds=10)) == 1
    assert store.list_worker_reports() == [seen_again]
    assert store.remove_worker_report(failed.name) is False  # already forgotten
    assert store.remove_worker_report(loaded.name) is True
    assert store.list_worker_reports() == []


def test_remote_node_client_certificate_rule_and_hostname_check_round_trip(store: Store) -> None:
    node = RemoteNode("modality", "MOD", "10.0.0.5", 104, role="source")
    assert (node.tls_client_certificate, node.tls_check_hostname) == ("optional", True)
    store.add_remote_node(replace(node, tls_client_certificate="required"))
    assert store.get_remote_node("modality").tls_client_certificate == "required"
    assert store.find_source("MOD", "10.0.0.5").tls_client_certificate == "required"
    store.update_remote_node(replace(node, tls=True, tls_check_hostname=False))
    got = store.get_remote_node("modality")
    assert (got.tls_client_certificate, got.tls_check_hostname, got.tls_verify_peer) == ("optional", False, True)
