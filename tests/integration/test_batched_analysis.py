"""Cross-study batching in a real analyze worker (``model.max_batch > 1``): sixteen single-image
studies pushed at once are decoded together, each gets exactly its own result (the tokens the same
image gets alone), and a worker SIGKILLed mid-batch loses no study and analyses none twice.

Production mode (a private Redis, SQLite, real ``serve`` and ``worker`` processes), tiny demo weights."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest

from dicom_node.store.base import RemoteNode
from tests.support.redis import redis_server  # noqa: F401 (fixture)
from tests.support.workers import NodeSite, make_chest_studies, storescu

pytestmark = pytest.mark.slow

BATCHED = {"model": {"max_batch": 8, "batch_wait_ms": 3000, "tasks": ["report", "abnormality_detection"], "max_new_tokens": 12}}


def distinct_chest_studies(folder: Path, count: int) -> list[Path]:
    """RG1-based single-image studies whose pixels differ (a dark band at a different height each)."""
    paths = make_chest_studies(folder, count)
    for index, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.copy()
        band = slice(20 + 25 * index, 40 + 25 * index)
        pixels[band, :] = pixels[band, :] // 3
        ds.PixelData = pixels.astype(pixels.dtype).tobytes()
        ds.save_as(path, enforce_file_format=True)
    return paths


def stored_results(site: NodeSite) -> dict[str, dict]:
    """SOP Instance UID -> stored AnalysisResult JSON (as dict), for every analysed instance."""
    import json

    store = site.store()
    try:
        out = {}
        for study in store.list_studies():
            for record in store.list_analyses(study.study_instance_uid, study.version):
                assert record.status == "analyzed", (record.sop_instance_uid, record.error)
                out[record.sop_instance_uid] = json.loads(record.result_json)
        return out
    finally:
        store.close()


def analysed_per_study(site: NodeSite) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for log in site.root.glob("worker-*.log"):
        for match in re.finditer(r"analyze (\S+) v\d+: 1 analysed", log.read_text(errors="replace")):
            found.setdefault(match.group(1), []).append(log.stem)
    return found


def alone_results(site: NodeSite, paths: list[Path]) -> dict[str, dict]:
    """Each file analysed alone, in this process, with the site's settings (same weights and tasks)."""
    import json

    from dicom_node.pipeline.analysis import analyze_datasets, load_engine

    engine = load_engine(replace(site.settings, model=replace(site.settings.model, max_batch=1)))
    out = {}
    for path in paths:
        ds = pydicom.dcmread(path)
        (outcome,) = analyze_datasets(engine, [ds], site.settings.model.tasks)
        out[str(ds.SOPInstanceUID)] = json.loads(outcome.result.to_json())  # as stored: JSON types
    return out


def comparable(result: dict) -> dict:
    result = dict(result)
    result.pop("timings")
    return result


def test_sixteen_studies_pushed_at_once_are_batched_and_each_gets_its_own_result(tmp_path, redis_server):
    site = NodeSite(tmp_path / "site", broker_url=redis_server.url, overrides=BATCHED)
    site.add_remote(RemoteNode("modality", "MODALITY", "127.0.0.1", 104, role="source"))
    files = distinct_chest_studies(tmp_path / "studies", 16)
    try:
        site.serve()
        site.worker("analyze,deliver", name="worker-batch")
        storescu(site.port, site.ae_title, files)
        studies = site.wait_for(lambda s: len(s) == 16 and all(x.state in ("done", "failed") for x in s), 600, "16 studies done")
        assert all(s.state == "done" for s in studies), [(s.state, s.error) for s in studies if s.state != "done"]
        results = stored_results(site)
        assert len(results) == 16
        per_study = analysed_per_study(site)
        assert set(per_study) == {s.study_instance_uid for s in studies}
        assert all(len(workers) == 1 for workers in per_study.values()), per_study
        # decoded in batches: several rows shared decode steps
        rows = [r["timings"].get("decode_rows_max", 0.0) for r in results.values()]
        assert max(rows) >= 4, rows
    finally:
        site.stop()
    alone = alone_results(site, files)
    assert set(alone) == set(results)
    texts = {json_text(r) for r in alone.values()}
    assert len(texts) > 1  # the images really differ, so a mix-up would show
    for sop_uid, result in results.items():
        assert result["sop_instance_uid"] == sop_uid
        assert comparable(result) == comparable(alone[sop_uid]), sop_uid


def json_text(result: dict) -> str:
    return repr([a["raw_text"] for a in result["answers"]]) + repr(result["image_labels"])


def test_sigkill_mid_batch_leaves_every_study_analysed_exactly_once(tmp_path, redis_server):
    site = NodeSite(tmp_path / "site", broker_url=redis_server.url,
                    overrides={"model": {**BATCHED["model"], "max_batch": 4, "max_new_tokens": 64, "stop_at_end_of_turn": False}})  # fmt: skip
    site.add_remote(RemoteNode("modality", "MODALITY", "127.0.0.1", 104, role="source"))
    files = distinct_chest_studies(tmp_path / "studies", 8)
    try:
        site.serve()
        site.worker("deliver", name="deliver")
        victim = site.worker("analyze", name="worker-victim")
        storescu(site.port, site.ae_title, files)
        site.wait_for(lambda s: len(s) == 8 and sum(x.state == "analyzing" for x in s) >= 2, 240, "a batch of studies in analysis")
        assert sum(s.state == "analyzing" for s in site.studies()) >= 2  # several studies claimed by one task
        site.kill(victim)  # SIGKILL to the worker and its pool child, mid-batch
        in_flight = [s.study_instance_uid for s in site.studies() if s.state == "analyzing"]
        assert in_flight  # their claims stay until the leases run out
        site.worker("analyze", name="worker-restarted")
        studies = site.wait_for(lambda s: len(s) == 8 and all(x.state in ("done", "failed") for x in s), 600, "8 studies done")
        assert all(s.state == "done" for s in studies), [(s.state, s.error) for s in studies if s.state != "done"]
        per_study = analysed_per_study(site)
        assert set(per_study) == {s.study_instance_uid for s in studies}
        assert all(len(workers) == 1 for workers in per_study.values()), per_study  # exactly once each
        assert any("worker-restarted" in per_study[uid] for uid in in_flight)
        assert len(stored_results(site)) == 8
    finally:
        site.stop()
