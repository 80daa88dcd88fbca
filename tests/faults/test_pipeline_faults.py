"""Faults the pipeline must survive with real processes: a worker SIGKILLed mid-inference, the
destination down for a while, Redis restarted mid-run, an image whose pixels cannot be decoded;
and two workers sharing twenty studies, each analysed exactly once.

Production mode (a private Redis + SQLite/PostgreSQL, workers started separately) except where
the embedded default is the point. Images are RG1 subsampled (see make_chest_studies)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, generate_uid
from pynetdicom import AE

from dicom_node.store.base import RemoteNode
from tests.support.orthanc import Orthanc
from tests.support.redis import redis_server  # noqa: F401 (fixture)
from tests.support.workers import NodeSite, make_chest_studies, storescu

pytestmark = pytest.mark.slow


def add_orthanc_destination(site: NodeSite, orthanc: Orthanc, profile: str = "sr-only") -> None:
    site.add_remote(RemoteNode("modality", "MODALITY", "127.0.0.1", 104, role="source"))
    site.add_remote(RemoteNode("pacs", orthanc.aet, "127.0.0.1", orthanc.dicom_port, role="destination",
                               profile=profile, default_destination=True))  # fmt: skip


def orthanc_sop_uids(orthanc: Orthanc) -> list[str]:
    return [orthanc.instance_tags(i)["SOPInstanceUID"] for i in orthanc.get("/instances")]


def produced_uids(site: NodeSite) -> set[str]:
    store = site.store()
    try:
        return {o.sop_instance_uid for s in store.list_studies() for o in store.list_produced_objects(s.study_instance_uid)}
    finally:
        store.close()


def analysed_per_study(site: NodeSite) -> dict[str, list[str]]:
    """study UID -> names of the worker logs that report analysing it (from the real worker logs)."""
    found: dict[str, list[str]] = {}
    for log in site.root.glob("worker-*.log"):
        for match in re.finditer(r"analyze (\S+) v\d+: 1 analysed", log.read_text(errors="replace")):
            found.setdefault(match.group(1), []).append(log.stem)
    return found


#: The tests about distribution and broker loss run the APM-only task: the LM adds nothing to what they
#: check and would make twenty studies take minutes on two cores. The SR is still built and delivered.
APM_ONLY = {"model": {"tasks": ["anatomy_grounding"]}}


def test_two_workers_split_twenty_studies_each_analysed_once(tmp_path, redis_server):
    site = NodeSite(tmp_path / "site", broker_url=redis_server.url, overrides=APM_ONLY)
    orthanc = Orthanc(tmp_path / "orthanc").start()
    add_orthanc_destination(site, orthanc)
    files = make_chest_studies(tmp_path / "studies", 20)
    try:
        site.serve()
        site.worker("analyze,deliver", name="worker-a")
        site.worker("analyze,deliver", name="worker-b")
        storescu(site.port, site.ae_title, files)
        studies = site.wait_for(lambda s: len(s) == 20 and all(x.state in ("done", "failed") for x in s), 600, "20 studies done")
        assert all(s.state == "done" for s in studies), [(s.state, s.error) for s in studies if s.state != "done"]
        per_study = analysed_per_study(site)
        assert set(per_study) == {s.study_instance_uid for s in studies}
        assert all(len(workers) == 1 for workers in per_study.values()), per_study  # exactly once
        by_worker = {w for workers in per_study.values() for w in workers}
        assert by_worker == {"worker-a", "worker-b"}, by_worker  # both took a share
        in_pacs = orthanc_sop_uids(orthanc)
        assert len(in_pacs) == len(set(in_pacs)) == 20  # the SR of each study, one copy each
        assert set(in_pacs) == produced_uids(site)
    finally:
        site.stop()
        orthanc.stop()


def test_sigkill_analyze_worker_mid_inference_then_restart(tmp_path, redis_server):
    site = NodeSite(tmp_path / "site", broker_url=redis_server.url)
    orthanc = Orthanc(tmp_path / "orthanc").start()
    add_orthanc_destination(site, orthanc)
    [path] = make_chest_studies(tmp_path / "studies", 1)
    try:
        site.serve()
        site.worker("deliver")
        victim = site.worker("analyze", name="worker-victim")
        storescu(site.port, site.ae_title, [path])
        site.wait_for(lambda s: bool(s) and s[0].state == "analyzing", 120, "analysis to start")
        victim_log = site.root / "worker-victim.log"
        deadline = time.monotonic() + 180
        while "model loaded from" not in victim_log.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # the model is loaded and the engine is running on the image (APM + LM take seconds)
        assert site.studies()[0].state == "analyzing"
        site.kill(victim)  # SIGKILL to the worker and its pool child
        assert site.studies()[0].state == "analyzing"  # the claim is still there, its lease will run out
        site.worker("analyze", name="worker-restarted")
        [study] = site.wait_for(lambda s: s[0].state in ("done", "failed"), 240, "the study to complete after the restart")
        assert study.state == "done", study.error
        assert "analyzing" in study.state_times
        in_pacs = orthanc_sop_uids(orthanc)
        assert len(in_pacs) == len(set(in_pacs)) == 2  # one result set
        assert set(in_pacs) == produced_uids(site)
        assert "worker-restarted" in analysed_per_study(site)[study.study_instance_uid]
    finally:
        site.stop()
        orthanc.stop()


def test_destination_down_for_a_while_then_back(tmp_path):
    """Embedded default: Orthanc is not running when results are ready; retries; it starts; one copy each."""
    site = NodeSite(tmp_path / "site")
    orthanc = Orthanc(tmp_path / "orthanc")  # ports chosen, not started yet
    add_orthanc_destination(site, orthanc)
    [path] = make_chest_studies(tmp_path / "studies", 1)
    try:
        site.serve()
        storescu(site.port, site.ae_title, [path])
        site.wait_for(lambda s: bool(s) and s[0].state == "delivering", 240, "delivery to start")
        store = site.store()
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                records = store.list_deliveries()
                if records and min(r.attempts for r in records) >= 3:
                    break
                time.sleep(0.3)
            assert records and all(r.status == "retrying" and "no association" in r.error for r in records), records
        finally:
            store.close()
        orthanc.start()
        [study] = site.wait_for(lambda s: s[0].state in ("done", "failed"), 120, "delivery after the PACS came back")
        assert study.state == "done", study.error
        in_pacs = orthanc_sop_uids(orthanc)
        assert len(in_pacs) == len(set(in_pacs)) == 2
        assert set(in_pacs) == produced_uids(site)
    finally:
        site.stop()
        orthanc.stop()


def undecodable_copy(good: Path, target: Path) -> Path:
    """Same study, a second image whose JPEG pixel data is garbage (valid encapsulation, bad codestream)."""
    ds = pydicom.dcmread(good)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8 + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(target, enforce_file_format=True)
    return target


def send_with_pynetdicom(port: int, called_ae: str, paths: list[Path]) -> None:
    """storescu would re-check the JPEG; pynetdicom sends the bytes as they are."""
    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title="MODALITY")
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    assert assoc.is_established
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert status and status.Status == 0, status
    finally:
        assoc.release()


def test_undecodable_image_fails_alone_and_the_good_one_is_delivered(tmp_path):
    site = NodeSite(tmp_path / "site")
    orthanc = Orthanc(tmp_path / "orthanc").start()
    add_orthanc_destination(site, orthanc)
    [good] = make_chest_studies(tmp_path / "studies", 1)
    bad = undecodable_copy(good, tmp_path / "studies" / "bad.dcm")
    try:
        site.serve()
        send_with_pynetdicom(site.port, site.ae_title, [good, bad])
        [study] = site.wait_for(lambda s: bool(s) and s[0].state in ("done", "failed"), 240, "the study to finish")
        assert study.state == "done", study.error
        assert "1 failed" in (study.error or "")  # the note says what happened to the bad image
        store = site.store()
        try:
            analyses = {a.sop_instance_uid: a for a in store.list_analyses(study.study_instance_uid, study.version)}
            instances = {i.sop_instance_uid: i for i in store.list_instances(study.study_instance_uid)}
        finally:
            store.close()
        good_uid, bad_uid = str(pydicom.dcmread(good).SOPInstanceUID), str(pydicom.dcmread(bad).SOPInstanceUID)
        assert analyses[good_uid].status == "analyzed" and instances[good_uid].state == "analyzed"
        assert analyses[bad_uid].status == "failed" and instances[bad_uid].state == "failed"
        assert "pixel data cannot be decoded" in analyses[bad_uid].error
        assert instances[bad_uid].reason == analyses[bad_uid].error
        in_pacs = [orthanc.instance_tags(i) for i in orthanc.get("/instances")]
        assert len(in_pacs) == 2
        assert all(tags["SOPInstanceUID"] in produced_uids(site) for tags in in_pacs)
    finally:
        site.stop()
        orthanc.stop()


def test_redis_restarted_mid_run_loses_no_study(tmp_path, redis_server):
    site = NodeSite(tmp_path / "site", broker_url=redis_server.url, overrides=APM_ONLY)
    orthanc = Orthanc(tmp_path / "orthanc").start()
    add_orthanc_destination(site, orthanc)
    files = make_chest_studies(tmp_path / "studies", 4)
    try:
        site.serve()
        site.worker("analyze,deliver", name="worker-a")
        storescu(site.port, site.ae_title, files)
        site.wait_for(lambda s: len(s) == 4 and sum(x.state == "queued" for x in s) >= 2, 120, "a backlog in the broker")
        run_id_before = redis_server.client().info("server")["run_id"]
        redis_server.restart()  # no persistence: every queued message is gone
        # A new server process that keeps nothing on disk. (Its key count is no proof: the node
        # reconnects and re-queues within milliseconds, which is the behaviour under test.)
        client = redis_server.client()
        assert client.info("server")["run_id"] != run_id_before
        assert client.config_get("save")["save"] == "" and client.config_get("appendonly")["appendonly"] == "no"
        studies = site.wait_for(lambda s: len(s) == 4 and all(x.state in ("done", "failed") for x in s), 400, "all 4 studies done")
        assert all(s.state == "done" for s in studies), [(s.state, s.error) for s in studies]
        in_pacs = orthanc_sop_uids(orthanc)
        assert len(in_pacs) == len(set(in_pacs)) == 4
        assert set(in_pacs) == produced_uids(site)
    finally:
        site.stop()
        orthanc.stop()
