"""Workers report their model (issue 10): a real ``anatomix-node worker`` with demo weights warms up
and reports; ``/readyz`` is ready only while a live worker has a usable model (and says why not),
``/api/status`` lists the workers seen, and ``/metrics`` carries ``anatomix_model_load_seconds``."""

from __future__ import annotations

import signal
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.api import make_accounts
from tests.support.net import free_port
from tests.support.redis import redis_server  # noqa: F401 (fixture)
from tests.support.workers import NodeSite

MAX_AGE_S = 6.0


def wait_until(check, timeout: float, what: str, site: NodeSite):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{site.logs()}")
        time.sleep(0.5)


def test_readyz_needs_a_live_worker_with_a_loaded_model_and_status_and_metrics_show_it(tmp_path, redis_server):
    http_port = free_port()
    site = NodeSite(tmp_path / "site", broker_url=redis_server.url,
                    overrides={"http": {"port": http_port, "worker_report_max_age_s": MAX_AGE_S}})  # fmt: skip
    base = f"http://127.0.0.1:{http_port}"

    class _Node:  # make_accounts needs only open_store
        open_store = site.store

    token = make_accounts(_Node(), ("viewer",)).tokens["viewer"]  # type: ignore[arg-type]
    try:
        site.serve()
        wait_until(lambda: _get(base + "/healthz") is not None, 60, "the HTTP API", site)
        ready = httpx.get(base + "/readyz", timeout=30)
        assert ready.status_code == 503, ready.text
        model = ready.json()["checks"]["model"]
        assert model["ok"] is False and "no analyze worker has reported" in model["detail"], model

        worker = site.worker("analyze,deliver", name="gpu-a@testhost")
        ready = wait_until(lambda: (r := _get(base + "/readyz")) is not None and r.status_code == 200 and r, 240,
                           "readyz with the worker's model", site)  # fmt: skip
        model = ready.json()["checks"]["model"]
        assert model["ok"] is True and model["workers"][0].startswith("gpu-a@testhost/"), model
        assert model["demo_weights"] is True and len(model["model_digest"]) == 64 and model["load_seconds"] > 0, model

        status = httpx.get(base + "/api/status", headers={"Authorization": f"Bearer {token}"}, timeout=30).json()
        [seen] = status["workers"]
        assert seen["name"] == model["workers"][0] and seen["queues"] == ["analyze", "deliver"], seen
        assert seen["live"] is True and seen["model"] == "loaded" and seen["model_ok"] is True and seen["error"] is None
        assert seen["model_digest"] == model["model_digest"] and seen["load_seconds"] == model["load_seconds"]
        in_use = httpx.get(base + "/api/model", headers={"Authorization": f"Bearer {token}"}, timeout=30).json()
        assert in_use["configured"] is True and in_use["demo_weights"] is True, in_use
        [loaded] = in_use["workers"]
        assert loaded["name"] == seen["name"] and loaded["model"] == "loaded" and loaded["model_digest"] == seen["model_digest"], loaded
        assert loaded["demo_weights"] is True and loaded["model_name"] == seen["model_name"] and loaded["model_name"]

        families = {f.name: f for f in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=30).text)}
        [load] = families["anatomix_model_load_seconds"].samples
        assert load.labels["worker"] == seen["name"] and load.value == seen["load_seconds"], load
        assert [s.value for s in families["anatomix_worker_model_ok"].samples] == [1]

        # Beats keep the report fresh past the window...
        time.sleep(MAX_AGE_S + 1)
        assert httpx.get(base + "/readyz", timeout=30).status_code == 200
        # ...and a worker that died stops counting once its last report is older than the window.
        site.kill(worker)
        stale = wait_until(lambda: (r := _get(base + "/readyz")) is not None and r.status_code == 503 and r, 30, "readyz to fail", site)
        model = stale.json()["checks"]["model"]
        assert "no analyze worker has reported" in model["detail"] and "gpu-a@testhost/" in model["detail"], model
        status = httpx.get(base + "/api/status", headers={"Authorization": f"Bearer {token}"}, timeout=30).json()
        assert [w["live"] for w in status["workers"]] == [False]
        assert httpx.get(base + "/api/model", headers={"Authorization": f"Bearer {token}"}, timeout=30).json()["workers"] == []
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=30).text)}
        assert families["anatomix_model_load_seconds"].samples == []
    finally:
        site.stop()


def test_a_worker_that_stops_cleanly_removes_its_report(tmp_path, redis_server):
    """SIGTERM (warm shutdown): the pool process and the deliver-only worker remove their rows, so
    /api/status lists no worker that is known to be gone."""
    site = NodeSite(tmp_path / "site", broker_url=redis_server.url, overrides={"http": {"worker_report_max_age_s": 60.0}})
    store = site.store()
    try:
        analyze = site.worker("analyze,deliver", name="gpu-b@testhost")
        deliver = site.worker("deliver", name="out-b@testhost")
        reports = wait_until(lambda: (r := store.list_worker_reports()) and len(r) == 2 and any(w.model_ok for w in r) and r, 240,
                             "both workers' reports", site)  # fmt: skip
        assert sorted(w.name.split("/")[0] for w in reports) == ["gpu-b@testhost", "out-b@testhost"]
        site.kill(analyze, signal.SIGTERM)
        assert analyze.returncode == 0, site.logs()
        [left] = wait_until(lambda: (r := store.list_worker_reports()) and len(r) == 1 and r, 30, "the analyze worker's row to go", site)
        assert left.name.startswith("out-b@testhost/")
        site.kill(deliver, signal.SIGTERM)
        wait_until(lambda: store.list_worker_reports() == [], 30, "the deliver worker's row to go", site)
    finally:
        store.close()
        site.stop()


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=10)
    except httpx.HTTPError:
        return None
