"""Analyze workers on another host (issue 23): no shared data directory, no database, only the node's
broker URL, API URL and a worker token. A worker reads its study with WADO-RS from the node, sends
the result objects back by STOW-RS, and the node delivers them to the PACS (DCMTK storescp) as if a
local worker had made them.

Production mode: PostgreSQL, a private Redis, ``serve`` with its HTTP service, a deliver worker
beside the node, and each remote worker in its own process group with its own empty
``storage.data_dir`` and a database URL that nothing answers.

One scenario (one node, to keep the suite's time down): the first remote worker reaches the node
through a relay that holds its STOW-RS request after the head and a little of the body, and is
SIGKILLed there, mid-transfer (every time, not by timing luck). The node keeps nothing of the broken
request, the lease runs out, dispatch queues the study again, and a second remote worker reads the
study over WADO-RS, reuses the result the first one recorded, sends the objects and completes.
The PACS receives each object exactly once.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import httpx
import pydicom
import pytest

from dicom_node.cli.processes import node_command
from dicom_node.store.base import RemoteNode
from tests.support.api import make_accounts
from tests.support.dcmtk import StoreScp
from tests.support.net import free_port
from tests.support.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)
from tests.support.redis import redis_server  # noqa: F401 (fixture)
from tests.support.remote_workers import HttpStallRelay, RemoteWorker, wait_for
from tests.support.workers import REPO, NodeSite, make_chest_studies, storescu

pytestmark = pytest.mark.slow

#: APM and one LM task (every result kind; quick on tiny demo weights); leases short enough for a quick re-queue,
#: long enough that renewals over HTTP on a loaded 2-core machine never miss one.
SETTINGS = {"model": {"tasks": ["anatomy_grounding", "report"]}, "queue": {"lease_s": 10.0}}


def add_worker_token(site: NodeSite, name: str, out) -> None:
    """``anatomix-node worker-token add NAME --out FILE``, as an admin would on the node."""
    done = subprocess.run(node_command("worker-token", "add", name, "--out", str(out), "--config", str(site.config_path)),
                          cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"worker token {name} written to {out}" in done.stdout
    assert out.stat().st_mode & 0o777 == 0o600


def test_remote_workers_over_http_survive_a_sigkill_mid_stow_and_the_pacs_gets_each_object_once(tmp_path, redis_server, postgres_url):
    http_port = free_port()
    site = NodeSite(tmp_path / "node", database_url=postgres_url, broker_url=redis_server.url, overrides={**SETTINGS, "http": {"port": http_port}})
    api_url = f"http://127.0.0.1:{http_port}"
    pacs = StoreScp(tmp_path / "pacs" / "in", ae_title="PACS", extra=("-dhl", "-v")).start()
    site.add_remote(RemoteNode("modality", "MODALITY", "127.0.0.1", 104, role="source"))
    site.add_remote(RemoteNode("pacs", "PACS", "127.0.0.1", pacs.port, role="destination", default_destination=True))
    [path] = make_chest_studies(tmp_path / "studies", 1)
    study_uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    token_file = tmp_path / "worker.token"
    add_worker_token(site, "gpu-host-1", token_file)
    relay = HttpStallRelay(http_port, marker=f"/api/worker/analyses/{study_uid}/1/studies/{study_uid}".encode())
    victim = RemoteWorker(tmp_path / "gpu-host-a", relay.url, token_file, redis_server.url)
    second = RemoteWorker(tmp_path / "gpu-host-b", api_url, token_file, redis_server.url)
    try:
        site.serve()
        site.worker("deliver", name="worker-deliver")
        victim.start(name="victim")
        storescu(site.port, site.ae_title, [path])
        wait_for(lambda: relay.stalled.is_set() or victim.process.poll() is not None, 300, "the first remote worker to send its results",
                 lambda: victim.log()[-3000:] + site.logs())  # fmt: skip
        assert victim.process.poll() is None, victim.log()[-3000:]
        assert site.studies()[0].state == "analyzing"
        victim.kill()  # SIGKILL to the worker and its pool child, mid STOW-RS
        relay.release()  # the held request is dropped: the node's body never ends
        killed_at = time.monotonic()
        assert site.studies()[0].state == "analyzing"  # the claim stands until its lease runs out
        second.start(name="second")
        [study] = site.wait_for(lambda s: s[0].state in ("done", "failed"), 240, "the study to finish after the kill")
        recovered_s = time.monotonic() - killed_at
        assert study.state == "done", f"{study.error}\n{second.log()[-3000:]}"

        store = site.store()
        try:
            produced = store.list_produced_objects(study_uid)
            deliveries = store.list_deliveries(study_uid)
            analyses = store.list_analyses(study_uid, 1)
        finally:
            store.close()
        kinds = {o.kind for o in produced}
        assert kinds - {"seg"} == {"sr", "text_sr", "gsps", "sc"}, kinds  # the SEG only when a finding was located
        # The node keeps the objects where a local worker writes them, and delivers them from there.
        assert all((site.settings.storage.results_dir / o.path).is_file() for o in produced)
        assert {(d.sop_instance_uid, d.status) for d in deliveries} == {(o.sop_instance_uid, "sent") for o in produced}
        # No duplicate in the PACS: one file per object, each under its own SOP Instance UID. storescp's own log
        # shows one C-STORE request per object, except that an object whose association was aborted before
        # its response reached the node is sent again (DIMSE is at least once; the same UID overwrites it).
        stored = sorted(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in pacs.output_dir.iterdir())
        assert stored == sorted(o.sop_instance_uid for o in produced)
        pacs_log = (pacs.output_dir.parent / "storescp-PACS.log").read_text(errors="replace")
        associations = re.split(r"I: Association Received", pacs_log)[1:]
        stores = [
            (Path(name).name.split(".", 1)[1].removesuffix(".dcm"), "Association Aborted" in assoc)
            for assoc in associations
            for name in re.findall(r"storing DICOM file: (\S+)", assoc)
        ]
        assert {uid for uid, _ in stores} == set(stored), pacs_log[-3000:]
        for uid in set(stored):
            tries = [aborted for u, aborted in stores if u == uid]
            assert all(tries[:-1]), f"{uid} stored {len(tries)} times without an aborted association between\n{pacs_log[-3000:]}"

        # The first worker's result was recorded before its upload: the second reused it (one analysis, no second run).
        assert [a.status for a in analyses] == ["analyzed"]
        serve_log = (site.root / "serve.log").read_text(errors="replace")
        assert f"analyze {study_uid} v1: claimed by remote worker gpu-host-1 (1 image(s), 0 with a result already)" in serve_log
        assert "went away while sending the result objects" in serve_log
        assert f"study {study_uid} v1: analyze worker lease expired, re-queued" in serve_log
        assert f"analyze {study_uid} v1: claimed by remote worker gpu-host-1 (1 image(s), 1 with a result already)" in serve_log
        assert f"analyze {study_uid} v1: analyzed on this remote worker" in second.log()
        # Nothing of the broken request is left in the node's folders.
        assert [p for p in site.settings.storage.data_dir.rglob("*") if p.suffix in (".part", ".tmp")] == []
        # The remote workers worked over HTTP: their data directories hold no spool, no results, no database.
        for worker in (victim, second):
            assert list(worker.data_dir.rglob("*")) == [], list(worker.data_dir.rglob("*"))

        # Its model report reaches the node over HTTP too (the warm-up may end after the reused result was sent).
        def second_report():
            store = site.store()
            try:
                return [r for r in store.list_worker_reports() if r.name.startswith("second/") and r.model_ok]
            finally:
                store.close()

        [report] = wait_for(second_report, 120, "the second worker's model report", second.log)  # type: ignore[misc]
        assert report.queues == ("analyze",) and report.demo_weights, report

        # A worker token reads over DICOMweb only a study it has claimed, and reports analyses; nothing else.
        class _Node:  # make_accounts needs only open_store
            open_store = site.store

        viewer = make_accounts(_Node(), roles=("viewer",)).tokens["viewer"]  # type: ignore[arg-type]
        worker_headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
        with httpx.Client(base_url=api_url, timeout=30) as http:
            assert http.get("/api/studies", headers=worker_headers).status_code == 403
            assert http.get("/api/auth/me", headers=worker_headers).status_code == 403
            assert http.get(f"/dicomweb/studies/{study_uid}", headers=worker_headers).status_code == 403  # its claim is over
            assert http.get("/api/worker/whoami", headers=worker_headers).json() == {"name": "gpu-host-1"}
            refused = http.post(f"/api/worker/analyses/{study_uid}/1/claim", headers={"Authorization": f"Bearer {viewer}"})
            assert refused.status_code == 403 and "worker token" in refused.json()["detail"]
            assert http.get("/api/worker/whoami", headers={"Authorization": "Bearer axw_not-a-token"}).status_code == 401
            done_again = http.post(f"/api/worker/analyses/{study_uid}/1/claim", headers=worker_headers)
            assert done_again.status_code == 409 and "done" in done_again.json()["detail"]  # nothing to claim twice
        print(f"finished by the second remote worker {recovered_s:.1f} s after the kill; {len(produced)} object(s), each stored once")
    finally:
        victim.stop()
        second.stop()
        site.stop()
        relay.close()
        pacs.stop()
