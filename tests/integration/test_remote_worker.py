"""An analyze worker on another host (issue 23): no shared data directory, no database, only the
node's broker URL, API URL and a worker token. It reads the study with WADO-RS from the node, sends
the result objects back by STOW-RS, and the node delivers them to the PACS (DCMTK storescp) as if a
local worker had made them.

Production mode: PostgreSQL, a private Redis, ``serve`` with its HTTP service, a deliver worker
beside the node, and the remote worker in its own process with its own empty ``storage.data_dir``
and a database URL that nothing answers.
"""

from __future__ import annotations

import re
import subprocess

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
from tests.support.remote_workers import RemoteWorker, wait_for
from tests.support.workers import REPO, NodeSite, make_chest_studies, storescu

pytestmark = pytest.mark.slow

#: APM and one LM task: the bundle has every kind but stays quick on tiny demo weights.
SETTINGS = {"model": {"tasks": ["anatomy_grounding", "report"]}, "queue": {"lease_s": 6.0}}


def add_worker_token(site: NodeSite, name: str, out) -> None:
    """``anatomix-node worker-token add NAME --out FILE``, as an admin would on the node."""
    done = subprocess.run(node_command("worker-token", "add", name, "--out", str(out), "--config", str(site.config_path)),
                          cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"worker token {name} written to {out}" in done.stdout
    assert out.stat().st_mode & 0o777 == 0o600


def test_a_worker_on_another_host_reads_over_wado_rs_and_its_results_reach_the_pacs_once(tmp_path, redis_server, postgres_url):
    http_port = free_port()
    site = NodeSite(tmp_path / "node", database_url=postgres_url, broker_url=redis_server.url, overrides={**SETTINGS, "http": {"port": http_port}})
    api_url = f"http://127.0.0.1:{http_port}"
    pacs = StoreScp(tmp_path / "pacs" / "in", ae_title="PACS", extra=("-dhl", "-v")).start()
    site.add_remote(RemoteNode("modality", "MODALITY", "127.0.0.1", 104, role="source"))
    site.add_remote(RemoteNode("pacs", "PACS", "127.0.0.1", pacs.port, role="destination", default_destination=True))
    [path] = make_chest_studies(tmp_path / "studies", 1)
    study_uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    token_file = tmp_path / "gpu-host" / "worker.token"
    token_file.parent.mkdir()
    add_worker_token(site, "gpu-host-1", token_file)
    remote = RemoteWorker(tmp_path / "gpu-host", api_url, token_file, redis_server.url)
    try:
        site.serve()
        site.worker("deliver", name="worker-deliver")
        remote.start()
        wait_for(lambda: "reaching the node at" in remote.log() or remote.process.poll() is not None, 120, "the remote worker to start", remote.log)
        storescu(site.port, site.ae_title, [path])
        [study] = site.wait_for(lambda s: bool(s) and s[0].state in ("done", "failed"), 240, "the study to be analysed remotely and delivered")
        assert study.state == "done", f"{study.error}\n{remote.log()}"

        store = site.store()
        try:
            produced = store.list_produced_objects(study_uid)
            deliveries = store.list_deliveries(study_uid)
            reports = store.list_worker_reports()
        finally:
            store.close()
        kinds = {o.kind for o in produced}
        assert kinds - {"seg"} == {"sr", "text_sr", "gsps", "sc"}, kinds  # the SEG only when a finding was located
        # The node keeps the objects where a local worker writes them, and delivers them from there.
        assert all((site.settings.storage.results_dir / o.path).is_file() for o in produced)
        assert {(d.sop_instance_uid, d.status) for d in deliveries} == {(o.sop_instance_uid, "sent") for o in produced}
        stored = sorted(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in pacs.output_dir.iterdir())
        assert stored == sorted(o.sop_instance_uid for o in produced)
        pacs_log = (pacs.output_dir.parent / "storescp-PACS.log").read_text(errors="replace")
        assert len(re.findall(r"Received Store Request", pacs_log)) == len(produced)

        # The remote worker did it, over HTTP: its data directory holds no spool, no results, no database.
        log = remote.log()
        assert f"analyze {study_uid} v1: analyzed on this remote worker" in log, log[-3000:]
        assert not any(p.name in ("spool", "results", "anatomix.db", "leases", "broker") for p in remote.data_dir.rglob("*")), list(remote.data_dir.rglob("*"))
        remote_reports = [r for r in reports if r.name.startswith("remote-gpu")]
        assert remote_reports and remote_reports[0].model_ok and remote_reports[0].queues == ("analyze",), reports
        serve_log = (site.root / "serve.log").read_text(errors="replace")
        assert f"analyze {study_uid} v1: claimed by remote worker gpu-host-1" in serve_log

        # A worker token reads over DICOMweb and reports analyses; nothing else. Accounts cannot act as workers.
        class _Node:  # make_accounts needs only open_store
            open_store = site.store

        viewer = make_accounts(_Node(), roles=("viewer",)).tokens["viewer"]  # type: ignore[arg-type]
        worker_headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
        with httpx.Client(base_url=api_url, timeout=30) as http:
            assert http.get("/api/studies", headers=worker_headers).status_code == 403
            assert http.get("/api/auth/me", headers=worker_headers).status_code == 403
            assert http.get("/api/worker/whoami", headers=worker_headers).json() == {"name": "gpu-host-1"}
            refused = http.post(f"/api/worker/analyses/{study_uid}/1/claim", headers={"Authorization": f"Bearer {viewer}"})
            assert refused.status_code == 403 and "worker token" in refused.json()["detail"]
            unknown = http.get("/api/worker/whoami", headers={"Authorization": "Bearer axw_not-a-token"})
            assert unknown.status_code == 401
            done_again = http.post(f"/api/worker/analyses/{study_uid}/1/claim", headers=worker_headers)
            assert done_again.status_code == 409 and "done" in done_again.json()["detail"]  # nothing to claim twice
    finally:
        remote.stop()
        site.stop()
        pacs.stop()
