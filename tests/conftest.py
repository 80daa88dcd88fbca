"""Top-level test configuration. Peer fixtures live in tests/support and per-package conftest files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: Where tests leave files worth looking at (rendered PNGs, logs): test-output/ in the checkout.
OUTPUT_DIR = Path(os.environ.get("ANATOMIX_TEST_OUTPUT", Path(__file__).resolve().parent.parent / "test-output"))


@pytest.fixture(scope="session")
def output_dir() -> Path:
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    return OUTPUT_DIR
