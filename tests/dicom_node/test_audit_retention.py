"""Audit retention in the store: ``purge_audit_events`` on SQLite and PostgreSQL (real servers)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dicom_node.store.base import AuditEvent, Store
from tests.support.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)
from tests.support.stores import store, store_url  # noqa: F401 (fixtures)


def test_purge_audit_events_deletes_only_older_rows(store: Store) -> None:
    now = datetime.now(UTC)
    for age_days in (400, 31, 29, 0):
        store.audit(
            AuditEvent(
                at=now - timedelta(days=age_days),
                event="probe",
                calling_ae=None,
                called_ae=None,
                peer_host=None,
                study_instance_uid=None,
                sop_instance_uid=None,
                detail={"age": age_days},
            )
        )
    assert store.purge_audit_events(now - timedelta(days=30)) == 2
    assert sorted(r.detail["age"] for r in store.list_audit_events("probe")) == [0, 29]
    assert store.purge_audit_events(now - timedelta(days=30)) == 0
    with pytest.raises(ValueError, match="timezone-aware"):
        store.purge_audit_events(datetime(2026, 1, 1))  # naive: refused, not guessed
