"""A deliver worker SIGKILLed mid-delivery (issue 21): its lease runs out, dispatch re-queues the
study, a fresh worker delivers it, and the PACS (DCMTK storescp) receives each object exactly once.

Production mode: a private Redis, serve (dispatch) and separate analyze and deliver workers. The
whole victim worker (parent and pool child) is killed, so Celery itself cannot hand the task back
(its message stays unacknowledged until the broker's visibility timeout, an hour): only the
re-queue of expired delivery leases brings the study back within the test's bound.
"""

from __future__ import annotations

import re
import time

import pydicom
import pytest

from dicom_node.store.base import RemoteNode
from tests.support.dcmtk import StoreScp
from tests.support.redis import redis_server  # noqa: F401 (fixture)
from tests.support.stall_proxy import StallingRelay
from tests.support.workers import NodeSite, make_chest_studies, storescu

pytestmark = pytest.mark.slow

#: APM only (the LM adds nothing here); short leases and timeouts so the re-queue comes in seconds.
SETTINGS = {"model": {"tasks": ["anatomy_grounding"]}, "queue": {"lease_s": 3.0}, "delivery": {"timeout_s": 3.0}}


def test_deliver_worker_killed_mid_c_store_is_requeued_and_the_pacs_gets_each_object_once(tmp_path, redis_server):
    site = NodeSite(tmp_path / "site", broker_url=redis_server.url, overrides=SETTINGS)
    pacs = StoreScp(tmp_path / "pacs" / "in", ae_title="PACS", extra=("-dhl", "-v")).start()
    relay = StallingRelay(pacs.port)  # holds the first C-STORE: the victim is then mid-delivery
    site.add_remote(RemoteNode("modality", "MODALITY", "127.0.0.1", 104, role="source"))
    site.add_remote(RemoteNode("pacs", "PACS", "127.0.0.1", relay.port, role="destination", default_destination=True))
    [path] = make_chest_studies(tmp_path / "studies", 1)
    study_uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    try:
        site.serve()
        site.worker("analyze", name="worker-analyze")
        victim = site.worker("deliver", name="worker-victim")
        storescu(site.port, site.ae_title, [path])
        deadline = time.monotonic() + 300
        while not relay.stalled.wait(0.5):
            site.check_alive()
            assert time.monotonic() < deadline, f"no C-STORE reached the PACS within 300 s\n{site.logs()}"
        assert site.studies()[0].state == "delivering"
        site.kill(victim)  # SIGKILL to the worker and its pool child, mid C-STORE
        relay.release()  # the held association is dropped: the PACS stored nothing of it
        killed_at = time.monotonic()
        assert site.studies()[0].state == "delivering"  # the claim is still there, its lease will run out
        site.worker("deliver", name="worker-restarted")
        [study] = site.wait_for(lambda s: s[0].state in ("done", "failed"), 120, "the delivery to finish after the kill")
        recovered_s = time.monotonic() - killed_at
        assert study.state == "done", study.error
        store = site.store()
        try:
            produced = {o.sop_instance_uid for o in store.list_produced_objects(study_uid)}
            rows = store.list_deliveries(study_uid)
        finally:
            store.close()
        assert produced and {(r.sop_instance_uid, r.status) for r in rows} == {(uid, "sent") for uid in produced}
        # Exactly once: one file per object and one C-STORE request per object in storescp's own log.
        stored = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in sorted(pacs.output_dir.iterdir())]
        assert sorted(stored) == sorted(produced), (stored, produced)
        pacs_log = (pacs.output_dir.parent / "storescp-PACS.log").read_text(errors="replace")
        assert len(re.findall(r"Received Store Request", pacs_log)) == len(produced), pacs_log[-3000:]
        serve_log = (site.root / "serve.log").read_text(errors="replace")
        assert f"study {study_uid} v1: delivery lease expired, re-queued" in serve_log
        print(f"re-delivered {len(produced)} object(s) {recovered_s:.1f} s after the kill")
    finally:
        site.stop()
        relay.close()
        pacs.stop()
