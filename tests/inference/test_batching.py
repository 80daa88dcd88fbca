"""Continuous batching on tiny demo weights: every image gets exactly its own result, the same as alone."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from inference.batching import ContinuousBatcher
from inference.demo_apm import synthetic_chest_radiograph
from inference.engine import Engine, EngineOptions
from inference.preprocess import prepare_array

TASKS = ["report", "abnormality_detection", "anatomy_grounding_lm:Right lung", "grounded_captioning"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    model_dir: Path = tiny_model_dir(1)
    return Engine.load(model_dir, EngineOptions(max_new_tokens=12))


@pytest.fixture(scope="module")
def images():
    shapes = [(900, 700), (600, 1000), (512, 512), (700, 701), (1000, 800), (640, 480)]
    return [prepare_array(synthetic_chest_radiograph(r, c, seed=i), f"1.2.826.0.1.3680043.10.1431.9.{i}") for i, (r, c) in enumerate(shapes)]


def without_timings(result) -> dict:
    data = result.to_dict()
    data.pop("timings")
    return data


def test_images_joining_mid_decode_get_the_results_they_get_alone(engine, images):
    alone = {image.sop_instance_uid: without_timings(engine.analyze([image], TASKS)[0]) for image in images}
    batcher = ContinuousBatcher(engine, TASKS, slots=4)
    results = {}
    for image in images[:3]:
        batcher.submit(("study", image.sop_instance_uid), image)
    for _ in range(5):  # a few tokens in: the rest join while the first ones decode
        results.update(batcher.step())
    cache = batcher._cache
    assert cache is not None and batcher.active_rows >= 2
    for image in images[3:]:
        batcher.submit(("study", image.sop_instance_uid), image)
    results.update(batcher.drain())
    assert batcher.idle and batcher._cache is cache  # one static cache for every batch composition
    assert batcher.peak_rows == 4  # rows were shared, and a finished sequence's row was reused
    assert batcher.loops_stopped > 0  # looping answers left early, where they leave when analysed alone
    assert sorted(results) == sorted(("study", image.sop_instance_uid) for image in images)
    for (_, uid), result in results.items():
        assert result.sop_instance_uid == uid
        assert without_timings(result) == alone[uid], uid
    assert any(answer.task == "grounded_captioning" for r in results.values() for answer in r.answers) or any(
        "grounded_captioning" in w for r in results.values() for w in r.warnings
    )


def test_one_slot_is_the_plain_engine(engine, images, caplog, monkeypatch):
    batcher = ContinuousBatcher(engine, ["report"], slots=1)
    batcher.submit("a", images[0])
    monkeypatch.setattr(engine, "progress_interval_s", 0.0)  # a progress line at every step
    with caplog.at_level(logging.INFO, logger="inference.batching"):
        ((key, result),) = batcher.drain()
    progress = [r.getMessage() for r in caplog.records if r.name == "inference.batching" and r.levelno == logging.INFO]
    assert progress and progress[0].startswith("decoding 1 sequence(s) (report x1), 0 image(s) waiting: "), progress
    assert key == "a" and batcher.peak_rows == 1
    assert without_timings(result) == without_timings(engine.analyze([images[0]], ["report"])[0])
    with pytest.raises(ValueError, match="slots"):
        ContinuousBatcher(engine, ["report"], slots=0)
