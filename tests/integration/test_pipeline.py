"""End to end with real peers: Orthanc (the PACS) pushes the real chest CR RG1 to the node; the node
analyses it with tiny demo weights and stores SR, text SR, SEG, GSPS and SC back into Orthanc.

Run on the embedded defaults (SQLite + filesystem broker, serve starts its own workers) and in
production mode (PostgreSQL + a private Redis, workers started separately)."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

from dicom_node.store.base import RemoteNode
from tests.support.orthanc import Orthanc
from tests.support.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)
from tests.support.redis import redis_server  # noqa: F401 (fixture)
from tests.support.workers import NodeSite

RG1 = Path(get_testdata_file("RG1_UNCR.dcm"))
SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.34": "sr",
    "1.2.840.10008.5.1.4.1.1.88.33": "sr",
    "1.2.840.10008.5.1.4.1.1.88.11": "text_sr",
    "1.2.840.10008.5.1.4.1.1.66.4": "seg",
    "1.2.840.10008.5.1.4.1.1.11.1": "gsps",
    "1.2.840.10008.5.1.4.1.1.7": "sc",
}


def start_pacs(tmp_path: Path, site: NodeSite) -> Orthanc:
    orthanc = Orthanc(tmp_path / "orthanc", aet="PACS", modalities={"node": (site.ae_title, site.port)}).start()
    site.add_remote(RemoteNode("pacs", "PACS", "127.0.0.1", orthanc.dicom_port, role="both", profile="full"))
    return orthanc


def push_study(orthanc: Orthanc, path: Path = RG1) -> str:
    """Upload to Orthanc and have Orthanc C-STORE it to the node; returns the Study Instance UID."""
    uploaded = orthanc.upload(path)
    reply = orthanc.post("/modalities/node/store", {"Resources": [uploaded["ID"]], "Synchronous": True})
    assert reply["FailedInstancesCount"] == 0, reply
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def result_instances(orthanc: Orthanc, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    """The node's objects now stored in Orthanc, read back as DICOM files, by kind."""
    found: dict[str, list[pydicom.Dataset]] = {}
    for orthanc_id in orthanc.get("/instances"):
        raw = orthanc.get(f"/instances/{orthanc_id}/file")
        ds = pydicom.dcmread(__import__("io").BytesIO(raw))
        if str(ds.StudyInstanceUID) == study_uid and str(ds.SOPClassUID) in SOP_CLASSES:
            found.setdefault(SOP_CLASSES[str(ds.SOPClassUID)], []).append(ds)
    return found


def referenced_uids(ds: pydicom.Dataset) -> set[str]:
    """Every SOP Instance UID the object references anywhere (evidence, source image, series refs)."""
    found: set[str] = set()

    def walk(dataset: pydicom.Dataset) -> None:
        for element in dataset:
            if element.keyword == "ReferencedSOPInstanceUID":
                found.add(str(element.value))
            elif element.VR == "SQ":
                for item in element.value:
                    walk(item)

    walk(ds)
    return found


def check_results_in_pacs(orthanc: Orthanc, study_uid: str) -> None:
    source = pydicom.dcmread(RG1, stop_before_pixels=True)
    results = result_instances(orthanc, study_uid)
    # The findings SEG exists only when the model located a finding (tiny demo weights may locate none).
    assert set(results) - {"seg"} == {"sr", "text_sr", "gsps", "sc"}, {k: len(v) for k, v in results.items()}
    assert all(len(v) == 1 for v in results.values()), {k: len(v) for k, v in results.items()}  # exactly one copy each
    for kind, [ds] in results.items():
        assert source.SOPInstanceUID in referenced_uids(ds), f"{kind} does not reference the source image"
        assert "DEMO" in str(ds.get("SeriesDescription", "")).upper(), f"{kind} series description lacks the demo flag"
    gsps = results["gsps"][0]
    boxes = [g for layer in gsps.GraphicAnnotationSequence for g in layer.get("GraphicObjectSequence", [])]
    assert boxes, "GSPS carries no graphics"
    for graphic in boxes:
        xs, ys = graphic.GraphicData[0::2], graphic.GraphicData[1::2]
        assert graphic.GraphicType == "POLYLINE" and len(xs) == 5
        assert all(0 <= x <= source.Columns for x in xs) and all(0 <= y <= source.Rows for y in ys)
        assert max(xs) > min(xs) and max(ys) > min(ys)
    sc = results["sc"][0]
    assert sc.BurnedInAnnotation == "YES"


def test_embedded_defaults_end_to_end(tmp_path):
    site = NodeSite(tmp_path / "site")
    orthanc = start_pacs(tmp_path, site)
    try:
        site.serve()
        study_uid = push_study(orthanc)
        [study] = site.wait_for(lambda s: bool(s) and s[0].state in ("done", "failed"), 240, "the study to finish")
        assert study.state == "done", (study.error, site.logs())
        check_results_in_pacs(orthanc, study_uid)
        assert {t for t in ("stable", "queued", "analyzing", "analyzed", "delivering", "done")} <= set(study.state_times)
    finally:
        site.stop()
        orthanc.stop()


def test_redis_and_postgres_end_to_end(tmp_path, postgres_url, redis_server):
    site = NodeSite(tmp_path / "site", database_url=postgres_url, broker_url=redis_server.url)
    orthanc = start_pacs(tmp_path, site)
    try:
        site.serve()  # production mode: serve runs the dispatch loop, not the workers
        site.worker("analyze")
        site.worker("deliver")
        study_uid = push_study(orthanc)
        [study] = site.wait_for(lambda s: bool(s) and s[0].state in ("done", "failed"), 240, "the study to finish")
        assert study.state == "done", (study.error, site.logs())
        check_results_in_pacs(orthanc, study_uid)
    finally:
        site.stop()
        orthanc.stop()
