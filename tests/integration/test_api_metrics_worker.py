"""``/metrics`` after a real push through the whole pipeline, parsed with the Prometheus client's own
parser: two sources push with DCMTK ``storescu`` into a node with two SCP processes, one instance
is refused (no Study Instance UID) and an unknown calling AE is refused at association; a real
``anatomix-node worker`` (demo weights, private Redis) analyses every study and delivers the results
to a DCMTK ``storescp`` destination. Then: counts per calling AE, associations per AE and outcome,
the refusal with its reason, studies by state, every stage histogram and the engine's per-task
histograms non-empty, deliveries per destination, and the worker's model load time.

Production mode (Redis, SQLite, real ``serve`` and ``worker`` processes) on the 2-core CI box."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pydicom
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from dicom_node.settings import DEFAULT_PROFILES
from dicom_node.store.base import RemoteNode
from inference.result import TIMING_COUNTS
from tests.support.dcmtk import StoreScp, echoscu, storescu
from tests.support.net import free_port
from tests.support.redis import redis_server  # noqa: F401 (fixture)
from tests.support.workers import NodeSite, make_chest_studies

STAGES = ("receive_to_stable", "stable_to_analyzed", "analysis", "delivery")  # metrics.StoreCollector._stage_histograms
ANALYSIS_TIMEOUT_S = 300


def scrape(base: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """{family name: [(sample name, labels, value), ...]} from a live /metrics."""
    response = httpx.get(base + "/metrics", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain"), response.text[:500]
    return {f.name: [(s.name, s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(response.text)}


def samples(families: dict, sample: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """Every (labels, value) of ``sample`` whose labels include ``labels``."""
    return [(lab, v) for family in families.values() for name, lab, v in family if name == sample and all(lab.get(k) == x for k, x in labels.items())]


def value(families: dict, sample: str, **labels: str) -> float | None:
    found = samples(families, sample, **labels)
    return sum(v for _, v in found) if found else None


def without_study_uid(source: Path, target: Path) -> Path:
    """A copy of ``source`` (new SOP Instance UID) without Study Instance UID: the node answers 0xC000."""
    ds = pydicom.dcmread(source)
    del ds.StudyInstanceUID
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(target, enforce_file_format=True)
    return target


def test_metrics_after_a_real_push_analysis_and_delivery_per_ae_and_stage(tmp_path, redis_server):
    http_port = free_port()
    base = f"http://127.0.0.1:{http_port}"
    pacs = StoreScp(tmp_path / "pacs" / "in", ae_title="PACS").start()
    site = NodeSite(tmp_path / "site", broker_url=redis_server.url,
                    overrides={"node": {"scp_processes": 2}, "http": {"port": http_port}})  # fmt: skip
    site.add_remote(RemoteNode("moda", "MODA", "127.0.0.1", 104, role="source"))
    site.add_remote(RemoteNode("modb", "MODB", "127.0.0.1", 104, role="source"))
    site.add_remote(RemoteNode("pacs", "PACS", "127.0.0.1", pacs.port, role="destination", profile="sr-only", default_destination=True))
    from_a = make_chest_studies(tmp_path / "a", 2)
    from_b = make_chest_studies(tmp_path / "b", 1)
    broken = without_study_uid(from_b[0], tmp_path / "broken.dcm")

    def logs() -> str:
        pacs_log = tmp_path / "pacs" / "storescp-PACS.log"
        return site.logs() + (f"\n----- storescp -----\n{pacs_log.read_text(errors='replace')[-2000:]}" if pacs_log.exists() else "")

    def wait_until(check, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result
            site.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs()}")
            time.sleep(0.5)

    try:
        site.serve()
        wait_until(lambda: _healthy(base), 60, "the HTTP API")
        site.worker("analyze,deliver", name="metrics-worker")

        for files, ae in ((from_a, "MODA"), (from_b, "MODB")):
            sent = storescu(site.port, files, ae, site.ae_title)
            assert sent.returncode == 0, f"{ae}: {sent.stderr[-2000:]}\n{logs()}"
        refused_instance = storescu(site.port, [broken], "MODB", site.ae_title, "-v")  # its own association, released
        said = refused_instance.stdout + refused_instance.stderr
        assert refused_instance.returncode != 0 and "Received Store Response (Error: CannotUnderstand)" in said and "Releasing Association" in said, (
            refused_instance
        )
        refused_association = echoscu(site.port, "STRANGER", site.ae_title)
        assert refused_association.returncode != 0, refused_association

        studies = len(from_a) + len(from_b)
        site.wait_for(lambda s: len(s) == studies and all(x.state in ("done", "failed") for x in s), ANALYSIS_TIMEOUT_S,
                      f"{studies} studies analysed and delivered")  # fmt: skip
        delivered = sorted(p for p in (tmp_path / "pacs" / "in").rglob("*") if p.is_file())
        assert delivered, f"storescp received nothing\n{logs()}"

        # /metrics reads the store at scrape; the counters come from the SCP processes' files.
        families = wait_until(
            lambda: (
                (f := scrape(base))
                and value(f, "anatomix_studies", state="done") == studies
                and value(f, "anatomix_deliveries", destination="pacs", status="sent") == len(delivered)
                and f
            ),
            60,
            "/metrics to show every study done and every result object sent",
        )
        report = f"\n{logs()}"

        # Instances and associations per calling AE, summed over the two SCP processes.
        assert value(families, "anatomix_instances_received_total", calling_ae="MODA") == len(from_a), report
        assert value(families, "anatomix_instances_received_total", calling_ae="MODB") == len(from_b), report
        assert value(families, "anatomix_instances_duplicate_total", calling_ae="MODA") in (None, 0), report
        assert value(families, "anatomix_associations_total", calling_ae="MODA", outcome="released") == 1, report
        assert value(families, "anatomix_associations_total", calling_ae="MODB", outcome="released") == 2, report
        assert value(families, "anatomix_associations_total", calling_ae="STRANGER", outcome="rejected") == 1, report
        assert value(families, "anatomix_associations_total", outcome="aborted") in (None, 0), report
        sizes = {ae: sum(p.stat().st_size for p in files) for ae, files in (("MODA", from_a), ("MODB", from_b))}
        for ae, size in sizes.items():
            got = value(families, "anatomix_received_bytes_total", calling_ae=ae)
            assert got is not None and size * 0.9 < got < size * 1.1 + 1024, (ae, size, got)
        # The refused instance: counted once, for MODB, with its reason (0xC000).
        rejected = samples(families, "anatomix_instances_rejected_total")
        assert [(lab["calling_ae"], lab["reason"], v) for lab, v in rejected if v] == [("MODB", "cannot_understand", 1.0)], rejected

        # Studies by state: all done.
        states = {lab["state"]: v for lab, v in samples(families, "anatomix_studies")}
        assert states["done"] == studies and sum(states.values()) == studies, states

        # Every stage the node records: one observation per study, buckets consistent, time spent.
        for stage in STAGES:
            count = value(families, "anatomix_stage_seconds_count", stage=stage)
            assert count == studies, (stage, count, samples(families, "anatomix_stage_seconds_count"))
            assert value(families, "anatomix_stage_seconds_bucket", stage=stage, le="+Inf") == count, stage
            assert value(families, "anatomix_stage_seconds_sum", stage=stage) > 0, stage
        assert value(families, "anatomix_stage_seconds_sum", stage="receive_to_stable") >= studies * 1.0  # the quiet period

        # The engine's own per-task timings: one observation per analysed image, for at least one task.
        engine = {lab["task"]: v for lab, v in samples(families, "anatomix_engine_seconds_count")}
        assert engine and all(v >= 1 for v in engine.values()), engine
        assert engine.get("total") == studies, engine  # one image per study (inference/engine.py times each "total")
        assert {"preprocess", "decode"} <= set(engine) and not set(engine) & set(TIMING_COUNTS), engine  # seconds only: no counts or rates
        for task, count in engine.items():
            assert value(families, "anatomix_engine_seconds_bucket", task=task, le="+Inf") == count, task

        # Deliveries: every result object the destination received is counted as sent, and nothing else.
        per_status = {lab["status"]: v for lab, v in samples(families, "anatomix_deliveries", destination="pacs")}
        assert per_status == {"sent": len(delivered)}, (per_status, [p.name for p in delivered])
        assert len(delivered) == studies * len(DEFAULT_PROFILES["sr-only"]), [p.name for p in delivered]  # SR + text SR each
        assert value(families, "anatomix_delivery_attempts", destination="pacs") >= len(delivered)

        # The live worker's model load time.
        [(load_labels, load_seconds)] = samples(families, "anatomix_model_load_seconds")
        assert load_labels["worker"].startswith("metrics-worker") and load_seconds > 0, (load_labels, load_seconds)
        assert [v for _, v in samples(families, "anatomix_worker_model_ok")] == [1]
    finally:
        site.stop()
        pacs.stop()


def _healthy(base: str) -> bool:
    try:
        return httpx.get(base + "/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
