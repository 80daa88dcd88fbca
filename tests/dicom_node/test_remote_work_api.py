"""The node's side of remote analyze workers (issue 23): ``/api/worker/...`` over real HTTP (uvicorn
in a thread) on a real SQLite store, driven by the worker's own client (requests + dicomweb-client).

A queued study with one chest CR; the worker token claims it, renews, sends a result, then its
result objects by STOW-RS, and completes it. Every wrong step gets a clear answer and changes nothing:
an account token, a second claim, another claim's id, a result that is not an AnalysisResult, a
body that is not multipart/related, a truncated body, a part that is not DICOM, an object no result
produces, a completion with an object missing.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pydicom
import pytest

from dicom_node.api import auth
from dicom_node.pipeline.remote_worker import CLAIM_HEADER, ClaimLost, NodeClient, NodeRefused, build_result_objects
from dicom_node.settings import Settings, StorageSettings
from dicom_node.store import open_store
from dicom_node.web.app import create_app
from tests.support.corpus import synthetic_cr
from tests.support.held_studies import ServedApp, part10, receive
from tests.support.net import free_port
from tests.support.results import make_result

STUDY = "1.2.826.0.1.3680043.8.498.88.1"  # not under output.uid_root: not our own output


@pytest.fixture
def node(tmp_path: Path):
    settings = replace(Settings(), storage=StorageSettings(data_dir=tmp_path / "node", min_free_bytes=0))
    store = open_store(settings.database_url)
    source = synthetic_cr(STUDY, STUDY + ".2.1", rows=96, columns=80, seed=3)
    receive(store, settings, source)
    assert store.transition_study(STUDY, 1, ("receiving",), "stable") and store.transition_study(STUDY, 1, ("stable",), "queued")
    secret = auth.new_secret(auth.WORKER_TOKEN_PREFIX)
    store.add_worker_token("gpu-1", auth.secret_hash(secret), datetime.now(UTC))
    viewer = auth.new_secret(auth.TOKEN_PREFIX)
    store.add_api_user(auth.new_user("vera", "viewer", auth.generate_password()))
    store.add_api_token("vera", "tests", auth.secret_hash(viewer), datetime.now(UTC))
    with ServedApp(create_app(settings, store), free_port()) as served:
        yield served.base, settings, store, source, secret, viewer
    store.close()


def test_a_claim_runs_from_queued_to_analyzed_and_every_wrong_step_is_refused_clearly(node) -> None:
    base, settings, store, source, secret, viewer = node
    analysis = f"{base}/api/worker/analyses/{STUDY}/1"
    refused = httpx.post(f"{analysis}/claim", headers={"Authorization": f"Bearer {viewer}"})
    assert refused.status_code == 403 and "worker token" in refused.json()["detail"]
    assert store.get_study(STUDY).state == "queued"

    worker = NodeClient(base, secret)
    wado = f"{base}/dicomweb/studies/{STUDY}/series/{source.SeriesInstanceUID}/instances/{source.SOPInstanceUID}"
    as_worker = {"Authorization": f"Bearer {secret}"}
    assert httpx.get(wado, headers=as_worker).status_code == 403  # not claimed: not readable
    order = worker.claim(STUDY, 1)
    assert order is not None and store.get_study(STUDY).state == "analyzing"
    # Claimed: the worker reads its study (WADO-RS, the stored bytes), but searches nothing.
    assert worker.retrieve_instance(STUDY, str(source.SeriesInstanceUID), str(source.SOPInstanceUID)).SOPInstanceUID == source.SOPInstanceUID
    assert httpx.get(f"{base}/dicomweb/studies", headers=as_worker).status_code == 403
    assert httpx.get(f"{base}/api/studies", headers=as_worker).status_code == 403
    assert [i["sop_instance_uid"] for i in order.images] == [str(source.SOPInstanceUID)] and order.images[0]["result"] is None
    assert order.output["uid_root"] == settings.output.uid_root and "sr" in order.kinds
    assert worker.claim(STUDY, 1) is None  # a second claim finds it taken
    worker.renew(order)
    with pytest.raises(ClaimLost, match="another claim"):
        worker.renew(replace(order, claim_id="not-this-claim"))

    sop = str(source.SOPInstanceUID)
    with pytest.raises(NodeRefused, match="422.*not an AnalysisResult"):
        worker.send_result(order, sop, '{"not": "a result"}', None)
    with pytest.raises(NodeRefused, match="422.*not in study"):
        worker.send_result(order, "1.2.3.4", None, "no such image")
    result = make_result(source, n_findings=2)
    worker.send_result(order, sop, result.to_json(), None)
    [recorded] = store.list_analyses(STUDY, 1)
    assert recorded.status == "analyzed" and json.loads(recorded.result_json) == json.loads(result.to_json())

    headers = {"Authorization": f"Bearer {secret}", CLAIM_HEADER: order.claim_id}
    stow = f"{analysis}/studies/{STUDY}"
    wrong_type = httpx.post(stow, headers={**headers, "Content-Type": "application/json"}, content=b"{}")
    assert wrong_type.status_code == 415 and "multipart/related" in wrong_type.json()["detail"]
    boundary = "b0undary"
    related = {**headers, "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    objects = build_result_objects(source, result, order)
    first = part10(objects[0])
    truncated = httpx.post(stow, headers=related, content=f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + first[:500])
    assert truncated.status_code == 400
    not_dicom = httpx.post(stow, headers=related, content=_multipart(boundary, [b"plain text, not DICOM"]))
    assert not_dicom.status_code == 409 and not_dicom.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    stray = httpx.post(stow, headers=related, content=_multipart(boundary, [part10(source)]))  # the source image is no result object
    assert stray.status_code == 409 and stray.json()["00081198"]["Value"][0]["00081155"]["Value"] == [sop]
    assert store.list_produced_objects(STUDY, 1) == []
    assert not list((settings.storage.data_dir).rglob("*.part")) and not (settings.storage.results_dir / STUDY).exists()

    with pytest.raises(NodeRefused, match="422.*not stored"):
        worker.complete(order, {sop: [str(ds.SOPInstanceUID) for ds in objects]})
    worker.store_result_objects(order, objects)  # dicomweb-client's STOW-RS
    produced = store.list_produced_objects(STUDY, 1)
    assert sorted(o.sop_instance_uid for o in produced) == sorted(str(ds.SOPInstanceUID) for ds in objects)
    for obj in produced:
        kept = pydicom.dcmread(settings.storage.results_dir / obj.path)
        assert obj.path == f"{STUDY}/v1/{obj.kind}-{obj.sop_instance_uid}.dcm" and str(kept.SOPInstanceUID) == obj.sop_instance_uid
    worker.store_result_objects(order, objects[:1])  # sent again (a retry): the same object, nothing new
    assert len(store.list_produced_objects(STUDY, 1)) == len(objects)

    assert worker.complete(order, {sop: [str(ds.SOPInstanceUID) for ds in objects]}) == "analyzed"
    assert store.get_study(STUDY).state == "analyzed"
    with pytest.raises(ClaimLost, match="analyzed"):
        worker.renew(order)  # the claim is over
    assert httpx.get(wado, headers=as_worker).status_code == 403  # and its study is no longer readable


def _multipart(boundary: str, parts: list[bytes]) -> bytes:
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n" for part in parts)
    return body + f"--{boundary}--\r\n".encode()


def test_a_model_that_fails_on_the_remote_worker_fails_the_study_at_the_node_with_the_reason(node) -> None:
    from dicom_node.pipeline.remote_worker import analyze_remote_study

    base, settings, store, source, secret, viewer = node

    def broken_engine():
        raise RuntimeError("checkpoint does not load")

    assert analyze_remote_study(NodeClient(base, secret), broken_engine, STUDY, 1) == "failed"
    study = store.get_study(STUDY)
    assert study.state == "failed" and study.error == "analysis failed: RuntimeError: checkpoint does not load"
    assert analyze_remote_study(NodeClient(base, secret), broken_engine, STUDY, 1) == "skipped"  # a redelivered message: nothing to do
