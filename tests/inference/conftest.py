"""Fixtures shared by the engine tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices: one thread is faster and immune to other processes on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(seed)``: a tiny demo model directory, written once per seed per test session and shared
    by the modules that only read it (writing one takes seconds; five modules used to write their own).
    A test that changes files copies the directory first."""
    from inference.demo_weights import write_demo_model_dir

    made: dict[int, Path] = {}

    def get(seed: int) -> Path:
        if seed not in made:
            made[seed] = write_demo_model_dir(tmp_path_factory.mktemp(f"tiny-seed{seed}") / "model", "tiny", seed=seed)
        return made[seed]

    return get
