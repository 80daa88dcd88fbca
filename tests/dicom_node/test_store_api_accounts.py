"""API accounts, tokens and sessions in the state store (migration 0003), on SQLite and a real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dicom_node.api import auth
from dicom_node.store.base import ApiSession, ApiUser, StoreConflict
from tests.dicom_node.test_store import store, store_url  # noqa: F401 (fixtures: both backends)
from tests.support.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def test_users_roles_and_removal_with_their_tokens_and_sessions(store):
    store.add_api_user(ApiUser("alice", "admin", auth.hash_password("a long password"), False, T0, T0))
    with pytest.raises(StoreConflict):
        store.add_api_user(ApiUser("alice", "viewer", "x", False, T0, T0))
    with pytest.raises(ValueError, match="role"):
        store.add_api_user(ApiUser("bob", "root", "x", False, T0, T0))
    user = store.get_api_user("alice")
    assert (user.role, user.disabled, user.created_at) == ("admin", False, T0)
    assert auth.verify_password(user.password_hash, "a long password") and not auth.verify_password(user.password_hash, "wrong")
    assert "a long password" not in user.password_hash and user.password_hash.startswith("$argon2id$")

    token = store.add_api_token("alice", "ci", "h1", T0)
    store.add_api_session(ApiSession("s1", "alice", "csrf", T0, datetime.now(UTC) + timedelta(hours=1)))
    assert store.get_api_session("s1", datetime.now(UTC)).csrf_token == "csrf"
    assert store.update_api_user("alice", role="operator", disabled=True)
    assert (store.get_api_user("alice").role, store.get_api_user("alice").disabled) == ("operator", True)
    assert store.get_api_session("s1", datetime.now(UTC)) is None  # a change of role or state ends sessions
    assert not store.update_api_user("nobody", role="viewer")
    assert store.find_api_token("h1", T0 + timedelta(minutes=1)).id == token.id
    assert store.list_api_tokens("alice")[0].last_used_at == T0 + timedelta(minutes=1)
    assert store.remove_api_user("alice") and not store.remove_api_user("alice")
    assert store.find_api_token("h1", T0) is None and store.list_api_tokens() == []
    with pytest.raises(KeyError):
        store.add_api_token("alice", "ci", "h2", T0)


def test_a_one_time_password_flag_and_a_password_change_that_keeps_its_own_session(store):
    """Migration 0009: a generated password must be changed; changing it ends the other sessions only."""
    store.add_api_user(auth.new_user("carol", "viewer", "generated password", must_change_password=True))
    assert store.get_api_user("carol").must_change_password
    later = datetime.now(UTC) + timedelta(hours=1)
    for session in ("mine", "other"):
        store.add_api_session(ApiSession(session, "carol", "c", T0, later))
    assert store.update_api_user("carol", password_hash=auth.hash_password("carol's own password"), must_change_password=False, keep_session="mine")
    user = store.get_api_user("carol")
    assert not user.must_change_password and auth.verify_password(user.password_hash, "carol's own password")
    assert store.get_api_session("mine", datetime.now(UTC)) is not None and store.get_api_session("other", datetime.now(UTC)) is None
    assert store.update_api_user("carol", must_change_password=True) and store.get_api_user("carol").must_change_password
    assert store.get_api_session("mine", datetime.now(UTC)) is not None  # the flag alone ends no session


def test_tokens_revoke_once_and_sessions_expire(store):
    store.add_api_user(ApiUser("ops", "operator", "x", False, T0, T0))
    first, second = store.add_api_token("ops", "a", "ha", T0), store.add_api_token("ops", "b", "hb", T0)
    assert second.id > first.id
    assert store.revoke_api_token(first.id, T0) and not store.revoke_api_token(first.id, T0)
    assert store.find_api_token("ha", T0) is None and store.find_api_token("hb", T0) is not None
    assert [t.revoked_at for t in store.list_api_tokens("ops")] == [T0, None]
    with pytest.raises(StoreConflict):
        store.add_api_token("ops", "dup", "hb", T0)
    store.add_api_session(ApiSession("old", "ops", "c", T0, T0 + timedelta(hours=1)))
    assert store.get_api_session("old", T0 + timedelta(minutes=59)) is not None
    assert store.get_api_session("old", T0 + timedelta(hours=1, seconds=1)) is None
    store.remove_api_session("old")
    assert store.get_api_session("old", T0) is None


def test_aggregates_count_studies_by_state_and_deliveries_of_current_versions_only(store):
    from dicom_node.store.base import DeliveryRecord
    from tests.dicom_node.test_store import instance

    store.record_instance(instance("1.2.1", study="1.2.9"))
    store.record_instance(instance("1.2.2", study="1.2.8"))
    assert store.transition_study("1.2.8", 1, ("receiving",), "stable")
    assert store.count_studies_by_state() == {"receiving": 1, "stable": 1}
    store.upsert_delivery(DeliveryRecord("1.2.9", 1, "pacs", "1.2.9.1", "sent", 2, 0, None, T0))
    store.upsert_delivery(DeliveryRecord("1.2.9", 1, "pacs", "1.2.9.2", "dead", 5, 0xA700, "full", T0))
    store.upsert_delivery(DeliveryRecord("1.2.9", 1, "pacs", "1.2.9.3", "dead", 1, None, "down", T0))
    store.upsert_delivery(DeliveryRecord("1.2.9", 7, "pacs", "1.2.9.4", "sent", 1, 0, None, T0))  # not the current version
    assert store.count_current_deliveries() == [("pacs", "dead", 2, 6), ("pacs", "sent", 1, 2)]
