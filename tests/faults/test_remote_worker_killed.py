"""A remote analyze worker (over HTTP, no shared data directory) SIGKILLed while it sends its result
objects to the node by STOW-RS (issue 23): the node keeps nothing of the broken request, the lease
runs out, dispatch queues the study again, a second remote worker finishes it, and the PACS (DCMTK
storescp) receives each object exactly once.

The victim reaches the node through a relay that holds its STOW-RS request after the head and a
little of the body, so the kill lands mid-transfer every time, not by timing luck.
"""

from __future__ import annotations

import re
import time

import pydicom
import pytest

from dicom_node.store.base import RemoteNode
from tests.integration.test_remote_worker import add_worker_token
from tests.support.dcmtk import StoreScp
from tests.support.net import free_port
from tests.support.redis import redis_server  # noqa: F401 (fixture)
from tests.support.remote_workers import HttpStallRelay, RemoteWorker, wait_for
from tests.support.workers import NodeSite, make_chest_studies, storescu

pytestmark = pytest.mark.slow

#: APM only (the LM adds nothing here); short leases so the re-queue comes in seconds.
SETTINGS = {"model": {"tasks": ["anatomy_grounding"]}, "queue": {"lease_s": 3.0}}


def test_a_remote_worker_killed_mid_stow_loses_no_study_and_the_pacs_gets_each_object_once(tmp_path, redis_server):
    http_port = free_port()
    site = NodeSite(tmp_path / "node", broker_url=redis_server.url, overrides={**SETTINGS, "http": {"port": http_port}})
    pacs = StoreScp(tmp_path / "pacs" / "in", ae_title="PACS", extra=("-dhl", "-v")).start()
    site.add_remote(RemoteNode("modality", "MODALITY", "127.0.0.1", 104, role="source"))
    site.add_remote(RemoteNode("pacs", "PACS", "127.0.0.1", pacs.port, role="destination", default_destination=True))
    [path] = make_chest_studies(tmp_path / "studies", 1)
    study_uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    token_file = tmp_path / "worker.token"
    add_worker_token(site, "gpu-host-1", token_file)
    relay = HttpStallRelay(http_port, marker=f"/api/worker/analyses/{study_uid}/1/studies/{study_uid}".encode())
    victim = RemoteWorker(tmp_path / "victim", relay.url, token_file, redis_server.url)
    second = RemoteWorker(tmp_path / "second", f"http://127.0.0.1:{http_port}", token_file, redis_server.url)
    try:
        site.serve()
        site.worker("deliver", name="worker-deliver")
        victim.start(name="victim")
        storescu(site.port, site.ae_title, [path])
        wait_for(lambda: relay.stalled.is_set() or victim.process.poll() is not None, 300, "the victim to start sending its results",
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
            produced = {o.sop_instance_uid for o in store.list_produced_objects(study_uid)}
            analyses = store.list_analyses(study_uid, 1)
        finally:
            store.close()
        # The victim's result was recorded before the upload: the second worker reused it (one analysis, no second run).
        assert [a.status for a in analyses] == ["analyzed"]
        assert f"analyze {study_uid} v1: analyzed on this remote worker" in second.log()
        # Exactly once: one file per object and one C-STORE request per object in storescp's own log.
        stored = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in sorted(pacs.output_dir.iterdir())]
        assert produced and sorted(stored) == sorted(produced), (stored, produced)
        pacs_log = (pacs.output_dir.parent / "storescp-PACS.log").read_text(errors="replace")
        assert len(re.findall(r"Received Store Request", pacs_log)) == len(produced), pacs_log[-3000:]
        serve_log = (site.root / "serve.log").read_text(errors="replace")
        assert f"study {study_uid} v1: analyze worker lease expired, re-queued" in serve_log
        assert "went away while sending the result objects" in serve_log
        assert f"analyze {study_uid} v1: claimed by remote worker gpu-host-1 (1 image(s), 1 with a result already)" in serve_log
        # Nothing of the broken request is left in the node's folders.
        leftovers = [p for p in site.settings.storage.data_dir.rglob("*") if p.suffix in (".part", ".tmp")]
        assert leftovers == []
        print(f"finished by the second remote worker {recovered_s:.1f} s after the kill; {len(produced)} object(s), each stored once")
    finally:
        victim.stop()
        second.stop()
        site.stop()
        relay.close()
        pacs.stop()
