"""The state store on both back ends: ``store_url`` (SQLite in the test's folder, then the shared
PostgreSQL server's fresh database) and ``store``, opened on it and closed after the test.

A test module takes them with ``from tests.support.stores import store, store_url`` beside the
PostgreSQL fixtures (``from tests.support.postgres import postgres_server, postgres_url``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.store import open_store
from dicom_node.store.base import Store


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'anatomix.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    opened = open_store(store_url)
    try:
        yield opened
    finally:
        opened.close()
