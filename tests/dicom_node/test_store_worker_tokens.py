"""Worker tokens in the state store (migration 0013), on SQLite and a real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dicom_node.api import auth
from dicom_node.store.base import StoreConflict
from tests.dicom_node.test_store import store, store_url  # noqa: F401 (fixtures: both backends)
from tests.support.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def test_a_worker_token_is_found_by_its_hash_until_revoked_and_its_name_can_then_be_reused(store):
    secret = auth.new_secret(auth.WORKER_TOKEN_PREFIX)
    token = store.add_worker_token("gpu-box-1", auth.secret_hash(secret), T0)
    assert (token.name, token.created_at, token.last_used_at, token.revoked_at) == ("gpu-box-1", T0, None, None)
    assert secret not in repr(store.list_worker_tokens())  # only the hash is kept
    with pytest.raises(StoreConflict, match="gpu-box-1"):
        store.add_worker_token("gpu-box-1", "another hash", T0)
    found = store.find_worker_token(auth.secret_hash(secret), T0 + timedelta(minutes=1))
    assert found is not None and found.id == token.id
    assert store.list_worker_tokens()[0].last_used_at == T0 + timedelta(minutes=1)
    assert store.find_worker_token(auth.secret_hash(secret + "x"), T0) is None
    # An API token's hash is not a worker token (separate tables, separate powers).
    assert store.find_worker_token(auth.secret_hash(auth.new_secret(auth.TOKEN_PREFIX)), T0) is None

    assert store.revoke_worker_token("gpu-box-1", T0 + timedelta(hours=1))
    assert not store.revoke_worker_token("gpu-box-1", T0 + timedelta(hours=2))  # nothing live by that name
    assert store.find_worker_token(auth.secret_hash(secret), T0 + timedelta(hours=2)) is None
    again = store.add_worker_token("gpu-box-1", "new hash", T0 + timedelta(hours=3))
    names = {t.name: t.revoked_at for t in store.list_worker_tokens()}
    assert names["gpu-box-1"] is None and again.id != token.id
    assert [revoked for name, revoked in names.items() if name.startswith("gpu-box-1 (revoked")] == [T0 + timedelta(hours=1)]
