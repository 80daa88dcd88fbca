"""The node as a DICOMweb source (issue 23 item 4): WADO-RS and QIDO-RS over what it holds.

One SQLite store and data folder for the module, holding two studies as the node would: study A with
a native CR and a JPEG-LS CR received (spooled, recorded) and the full result bundle of the first
(SR, SEG, text SR, GSPS, SC, KOS under results_dir); study B, another patient, without results. The
API application (console mounted) is reached in-process with FastAPI's TestClient, and over real HTTP
(uvicorn) by dicomweb-client, the library remote workers use.
"""

from __future__ import annotations

import json
from dataclasses import replace
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from fastapi.testclient import TestClient
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from dicom_node.api import auth
from dicom_node.settings import HttpSettings, Settings, StorageSettings
from dicom_node.store import open_store
from dicom_node.web.app import create_app
from tests.support.corpus import synthetic_cr
from tests.support.held_studies import HeldStudy, ServedApp, hold_study, multipart_parts, part10, receive
from tests.support.net import free_port

STUDY_A = "1.2.826.0.1.3680043.10.1431.77.1"
STUDY_B = "1.2.826.0.1.3680043.10.1431.77.2"
ROOT = "/dicomweb"


class Site:
    def __init__(self, app, store, settings: Settings, a: HeldStudy, b: HeldStudy, tokens: dict[str, str], passwords: dict[str, str]) -> None:
        self.app, self.store, self.settings, self.a, self.b, self.tokens, self.passwords = app, store, settings, a, b, tokens, passwords

    def client(self, role: str | None = "viewer") -> TestClient:
        client = TestClient(self.app)
        if role:
            client.headers["Authorization"] = f"Bearer {self.tokens[role]}"
        return client


def _sources() -> tuple[list[pydicom.Dataset], list[pydicom.Dataset]]:
    native = synthetic_cr(STUDY_A, STUDY_A + ".2.1", rows=96, columns=80, seed=1)
    native.PatientName, native.PatientID, native.StudyDate, native.AccessionNumber = "Doe^Jane", "PID-A", "20261130", "ACC-A"
    native.StudyDescription = "Chest PA"
    compressed = synthetic_cr(STUDY_A, STUDY_A + ".2.2", rows=96, columns=80, seed=2)
    compressed.PatientName, compressed.PatientID, compressed.StudyDate = "Doe^Jane", "PID-A", "20261130"
    compressed.compress(JPEGLSLossless, generate_instance_uid=False)
    other = synthetic_cr(STUDY_B, STUDY_B + ".2.1", rows=64, columns=64, seed=3, sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1")
    other.PatientName, other.PatientID, other.StudyDate, other.Modality = "Roe^Richard", "PID-B", "20250615", "DX"
    return [native, compressed], [other]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    root: Path = tmp_path_factory.mktemp("dicomweb-read")
    settings = replace(Settings(), storage=replace(StorageSettings(), data_dir=root / "data"))
    store = open_store(f"sqlite:///{root / 'state.db'}")
    tokens, passwords = {}, {}
    for name, role, one_time in (("viewer", "viewer", False), ("newbie", "viewer", True)):
        passwords[name] = auth.generate_password()
        store.add_api_user(auth.new_user(name, role, passwords[name], must_change_password=one_time))
        tokens[name] = auth.new_secret(auth.TOKEN_PREFIX)
        store.add_api_token(name, "tests", auth.secret_hash(tokens[name]), store.get_api_user(name).created_at)
    a_sources, b_sources = _sources()
    a = hold_study(store, settings, a_sources)
    b = HeldStudy(STUDY_B, b_sources, {})
    receive(store, settings, b_sources[0])
    yield Site(create_app(settings, store), store, settings, a, b, tokens, passwords)
    store.close()


def spooled_bytes(site: Site, sop_instance_uid: str, *more_studies: str) -> bytes:
    [row] = [i for s in (STUDY_A, STUDY_B, *more_studies) for i in site.store.list_instances(s) if i.sop_instance_uid == sop_instance_uid]
    return (site.settings.storage.spool_dir / row.path).read_bytes()


# ---- WADO-RS retrieve ----------------------------------------------------------------------------------------


def test_instance_and_series_retrieve_answer_the_stored_bytes(site: Site) -> None:
    native, compressed = site.a.sources
    client = site.client()
    url = f"{ROOT}/studies/{STUDY_A}/series/{native.SeriesInstanceUID}"
    answer = client.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith('multipart/related; type="application/dicom"; boundary=')
    parts = multipart_parts(answer.headers["content-type"], answer.content)
    assert [body for _, body in parts] == [spooled_bytes(site, str(native.SOPInstanceUID)), spooled_bytes(site, str(compressed.SOPInstanceUID))]
    assert [t for t, _ in parts] == [f"application/dicom; transfer-syntax={ExplicitVRLittleEndian}", f"application/dicom; transfer-syntax={JPEGLSLossless}"]
    one = client.get(f"{url}/instances/{compressed.SOPInstanceUID}", headers={"Accept": "multipart/related; type=application/dicom; transfer-syntax=*"})
    assert one.status_code == 200
    [(_, body)] = multipart_parts(one.headers["content-type"], one.content)
    assert body == spooled_bytes(site, str(compressed.SOPInstanceUID))
    single = client.get(f"{url}/instances/{native.SOPInstanceUID}", headers={"Accept": "application/dicom"})
    assert single.status_code == 200 and single.content == spooled_bytes(site, str(native.SOPInstanceUID))


def test_a_study_retrieve_holds_the_received_instances_and_the_results(site: Site) -> None:
    answer = site.client().get(f"{ROOT}/studies/{STUDY_A}")
    assert answer.status_code == 200
    uids = [
        str(pydicom.dcmread(pydicom.filebase.DicomBytesIO(body)).SOPInstanceUID) for _, body in multipart_parts(answer.headers["content-type"], answer.content)
    ]
    expected = [str(s.SOPInstanceUID) for s in site.a.sources] + [str(r.SOPInstanceUID) for r in site.a.results.values()]
    assert sorted(uids) == sorted(expected) and len(site.a.results) >= 5
    seg = site.client().get(f"{ROOT}/studies/{STUDY_A}/series/{site.a.series_of('seg')}/instances/{site.a.results['seg'].SOPInstanceUID}")
    [(_, body)] = multipart_parts(seg.headers["content-type"], seg.content)
    assert body == part10(site.a.results["seg"]) or pydicom.dcmread(pydicom.filebase.DicomBytesIO(body)).SOPInstanceUID == site.a.results["seg"].SOPInstanceUID


def test_asking_for_explicit_little_endian_decodes_a_compressed_instance(site: Site) -> None:
    _, compressed = site.a.sources
    answer = site.client().get(f"{ROOT}/studies/{STUDY_A}/series/{compressed.SeriesInstanceUID}/instances/{compressed.SOPInstanceUID}",
                               headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={ExplicitVRLittleEndian}'})  # fmt: skip
    assert answer.status_code == 200, answer.text
    [(ctype, body)] = multipart_parts(answer.headers["content-type"], answer.content)
    assert ctype.endswith(ExplicitVRLittleEndian)
    decoded = pydicom.dcmread(pydicom.filebase.DicomBytesIO(body))
    assert decoded.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian and decoded.SOPInstanceUID == compressed.SOPInstanceUID
    assert np.array_equal(decoded.pixel_array, compressed.pixel_array)


def test_dicomweb_client_reads_a_series_over_real_http(site: Site) -> None:
    native, compressed = site.a.sources
    with ServedApp(site.app, free_port()) as served:
        client = DICOMwebClient(served.base + ROOT, headers={"Authorization": f"Bearer {site.tokens['viewer']}"})
        got = client.retrieve_series(STUDY_A, str(native.SeriesInstanceUID))
        assert sorted(str(d.SOPInstanceUID) for d in got) == sorted([str(native.SOPInstanceUID), str(compressed.SOPInstanceUID)])
        one = client.retrieve_instance(STUDY_A, str(native.SeriesInstanceUID), str(native.SOPInstanceUID))
        assert np.array_equal(one.pixel_array, native.pixel_array)
        sr = client.retrieve_instance(STUDY_A, site.a.series_of("sr"), str(site.a.results["sr"].SOPInstanceUID))
        assert sr.SOPClassUID == site.a.results["sr"].SOPClassUID
        studies = client.search_for_studies(search_filters={"PatientID": "PID-A"})
        assert [s["0020000D"]["Value"][0] for s in studies] == [STUDY_A]


# ---- bad requests -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, status, words", [
    (f"{ROOT}/studies/1.2.3.999", 404, "no study 1.2.3.999"),
    (f"{ROOT}/studies/{STUDY_A}/series/1.2.3.999", 404, "no series 1.2.3.999"),
    (f"{ROOT}/studies/{STUDY_A}/series/{STUDY_A}.1/instances/1.2.3.999", 404, "no instance 1.2.3.999"),
    (f"{ROOT}/studies/{STUDY_A}/series/{STUDY_A}.1/instances/{STUDY_A}.2.1/frames/2", 404, "no frame 2"),
    (f"{ROOT}/studies/{STUDY_A}/series/{STUDY_A}.1/instances/{STUDY_A}.2.1/frames/0", 400, "positive integers"),
    (f"{ROOT}/studies/{STUDY_A}/series/{STUDY_A}.1/instances/{STUDY_A}.2.1/bulkdata/00100010", 404, "only its pixel data"),
    (f"{ROOT}/studies/1.2.abc", 400, "not a DICOM UID"),
    (f"{ROOT}/studies/{'1.2' * 30}", 400, "at most 64 characters"),
    (f"{ROOT}/studies/{STUDY_A}/series/1.2..3/metadata", 400, "not a DICOM UID"),
    (f"{ROOT}/studies?limit=-1", 400, "limit must be a non-negative integer"),
    (f"{ROOT}/studies?NoSuchKeyword=1", 400, "'NoSuchKeyword' is neither a DICOM keyword"),
    (f"{ROOT}/studies?StudyDate=yesterday", 400, "StudyDate (DA) takes a value or a range"),
    (f"{ROOT}/studies?includefield=7777777x", 400, "neither a DICOM keyword"),
    (f"{ROOT}/studies/{STUDY_A}/series?fuzzymatching=maybe", 400, "fuzzymatching must be true or false"),
])  # fmt: skip
def test_bad_requests_get_clear_problems(site: Site, path: str, status: int, words: str) -> None:
    answer = site.client().get(path)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert words in answer.json()["detail"], answer.json()


def test_an_accept_header_the_node_cannot_satisfy_is_406(site: Site) -> None:
    native, compressed = site.a.sources
    base = f"{ROOT}/studies/{STUDY_A}/series/{native.SeriesInstanceUID}/instances"
    for url, accept in ((f"{base}/{native.SOPInstanceUID}", "image/jpeg"),
                        (f"{base}/{compressed.SOPInstanceUID}", 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'),
                        (f"{base}/{compressed.SOPInstanceUID}/frames/1", "multipart/related; type=image/jpeg")):  # fmt: skip
        answer = site.client().get(url, headers={"Accept": accept})
        assert answer.status_code == 406, (url, answer.text)
        assert "the request accepts" in answer.json()["detail"] or "not in" in answer.json()["detail"]


def test_no_account_is_401_and_a_one_time_password_session_is_403(site: Site) -> None:
    url = f"{ROOT}/studies/{STUDY_A}/series/{STUDY_A}.1"
    nobody = site.client(None).get(url)
    assert nobody.status_code == 401 and nobody.headers["www-authenticate"] == "Bearer"
    forged = site.client(None).get(url, headers={"Authorization": "Bearer axn_not-a-token"})
    assert forged.status_code == 401 and "unknown" in forged.json()["detail"]
    newbie = site.client(None)
    assert newbie.post("/api/auth/login", json={"username": "newbie", "password": site.passwords["newbie"]}).status_code == 200
    refused = newbie.get(url)
    assert refused.status_code == 403 and "one-time password" in refused.json()["detail"]
    assert site.client(None).get(f"{ROOT}/studies").status_code == 401


def test_retrieves_are_audited_with_the_account(site: Site) -> None:
    site.client().get(f"{ROOT}/studies/{STUDY_B}")
    events = [e for e in site.store.list_audit_events("dicomweb_retrieved") if e.study_instance_uid == STUDY_B]
    assert events and events[0].user == "viewer" and events[0].detail["what"] == "retrieve" and events[0].detail["objects"] == 1
    assert "PID-B" not in json.dumps(events[0].detail)


# ---- QIDO-RS ----------------------------------------------------------------------------------------------------


def values(answer, tag: str) -> list:
    return [item.get(tag, {}).get("Value", [None])[0] for item in answer.json()]


@pytest.mark.parametrize("query, expected", [
    ("", [STUDY_B, STUDY_A]),  # newest first
    ("PatientName=doe*", [STUDY_A]),  # wildcard, case-insensitive for names
    ("PatientName=D?e^Jane", [STUDY_A]),
    ("00100020=PID-B", [STUDY_B]),
    ("StudyDate=20260101-", [STUDY_A]),
    ("StudyDate=-20251231", [STUDY_B]),
    ("StudyDate=20250615", [STUDY_B]),
    (f"StudyInstanceUID={STUDY_A},{STUDY_B}&limit=1", [STUDY_B]),
    (f"StudyInstanceUID={STUDY_A},{STUDY_B}&limit=1&offset=1", [STUDY_A]),
    ("ModalitiesInStudy=SEG", [STUDY_A]),
    ("ModalitiesInStudy=DX", [STUDY_B]),
    ("AccessionNumber=ACC-A&fuzzymatching=false", [STUDY_A]),
    ("PatientName=Nobody", []),
])  # fmt: skip
def test_study_search_matches_as_ps3_4_says(site: Site, query: str, expected: list[str]) -> None:
    answer = site.client().get(f"{ROOT}/studies?{query}")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/dicom+json", answer.text
    assert values(answer, "0020000D") == expected


def test_a_study_answer_counts_series_and_instances_and_names_its_modalities(site: Site) -> None:
    [study] = site.client().get(f"{ROOT}/studies?StudyInstanceUID={STUDY_A}&includefield=00081030,SOPClassesInStudy").json()
    series = {site.a.sources[0].SeriesInstanceUID} | {r.SeriesInstanceUID for r in site.a.results.values()}
    assert study["00201206"]["Value"] == [len(series)] and study["00201208"]["Value"] == [2 + len(site.a.results)]
    assert set(study["00080061"]["Value"]) >= {"CR", "SR", "SEG", "PR"} and study["00100010"]["Value"] == [{"Alphabetic": "Doe^Jane"}]
    assert study["00081030"]["Value"] == ["Chest PA"] and "1.2.840.10008.5.1.4.1.1.66.4" in study["00080062"]["Value"]
    assert study["00081190"]["Value"] == [f"{ROOT}/studies/{STUDY_A}"]


def test_series_and_instance_search_within_a_study(site: Site) -> None:
    client = site.client()
    series = client.get(f"{ROOT}/studies/{STUDY_A}/series").json()
    assert {s["0020000E"]["Value"][0] for s in series} == {str(site.a.sources[0].SeriesInstanceUID)} | {site.a.series_of(k) for k in site.a.results}
    [seg] = client.get(f"{ROOT}/studies/{STUDY_A}/series?Modality=SEG&SeriesDescription=Findings*").json()
    assert seg["0020000E"]["Value"] == [site.a.series_of("seg")] and seg["00201209"]["Value"] == [1]
    instances = client.get(f"{ROOT}/studies/{STUDY_A}/series/{site.a.sources[0].SeriesInstanceUID}/instances").json()
    assert sorted(i["00080018"]["Value"][0] for i in instances) == sorted(str(s.SOPInstanceUID) for s in site.a.sources)
    [sr] = client.get(f"{ROOT}/studies/{STUDY_A}/instances?SOPClassUID=1.2.840.10008.5.1.4.1.1.88.34").json()
    assert sr["00080018"]["Value"] == [str(site.a.results["sr"].SOPInstanceUID)] and sr["00080056"]["Value"] == ["ONLINE"]


# ---- metadata, frames, bulk data ------------------------------------------------------------------------------------


def test_series_metadata_is_each_header_with_the_pixel_data_as_a_bulk_data_uri(site: Site) -> None:
    native, compressed = site.a.sources
    client = site.client()
    metadata = client.get(f"{ROOT}/studies/{STUDY_A}/series/{native.SeriesInstanceUID}/metadata").json()
    by_uid = {m["00080018"]["Value"][0]: m for m in metadata}
    for source in (native, compressed):
        item = by_uid[str(source.SOPInstanceUID)]
        assert item["00280010"]["Value"] == [96] and item["00083002"]["Value"] == [str(source.file_meta.TransferSyntaxUID)]
        uri = item["7FE00010"]["BulkDataURI"]
        assert uri == f"{ROOT}/studies/{STUDY_A}/series/{source.SeriesInstanceUID}/instances/{source.SOPInstanceUID}/bulkdata/7FE00010"
        bulk = client.get(uri, headers={"Accept": "multipart/related; type=application/octet-stream"})
        [(_, pixels)] = multipart_parts(bulk.headers["content-type"], bulk.content)
        assert np.array_equal(np.frombuffer(pixels, "<u2").reshape(96, 80), source.pixel_array)
    [sr] = client.get(f"{ROOT}/studies/{STUDY_A}/series/{site.a.series_of('sr')}/metadata").json()
    assert "7FE00010" not in sr and sr["0040A730"]["vr"] == "SQ"  # the SR's content tree, as OHIF reads it


def test_frames_are_sent_as_stored_or_decoded_as_asked(site: Site) -> None:
    _, compressed = site.a.sources
    url = f"{ROOT}/studies/{STUDY_A}/series/{compressed.SeriesInstanceUID}/instances/{compressed.SOPInstanceUID}/frames/1"
    client = site.client()
    stored = client.get(url, headers={"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"})
    assert stored.status_code == 200 and f"transfer-syntax={JPEGLSLossless}" in stored.headers["content-type"]
    [(ctype, jls)] = multipart_parts(stored.headers["content-type"], stored.content)
    assert ctype == f"application/octet-stream; transfer-syntax={JPEGLSLossless}" and jls[:2] == b"\xff\xd8"  # a JPEG-LS codestream
    decoded = client.get(url, headers={"Accept": "multipart/related; type=application/octet-stream"})
    [(ctype, raw)] = multipart_parts(decoded.headers["content-type"], decoded.content)
    assert ctype.endswith(ExplicitVRLittleEndian) and np.array_equal(np.frombuffer(raw, "<u2").reshape(96, 80), compressed.pixel_array)
    sc = site.a.results["sc"]
    frames = client.get(f"{ROOT}/studies/{STUDY_A}/series/{sc.SeriesInstanceUID}/instances/{sc.SOPInstanceUID}/frames/1,1",
                        headers={"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"})  # fmt: skip
    assert len(multipart_parts(frames.headers["content-type"], frames.content)) == 2


def test_a_big_endian_instance_is_sent_as_stored_and_its_frames_decoded(site: Site) -> None:
    study = "1.2.826.0.1.3680043.10.1431.77.3"
    ds = synthetic_cr(study, study + ".2.1", rows=32, columns=24, seed=4)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.2"
    buffer = BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=False, enforce_file_format=True)
    receive(site.store, site.settings, pydicom.dcmread(BytesIO(buffer.getvalue())))
    url = f"{ROOT}/studies/{study}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    client = site.client()
    stored = client.get(url)
    [(ctype, body)] = multipart_parts(stored.headers["content-type"], stored.content)
    assert ctype.endswith("1.2.840.10008.1.2.2") and body == spooled_bytes(site, str(ds.SOPInstanceUID), study)
    assert client.get(url, headers={"Accept": f"multipart/related; type=application/dicom; transfer-syntax={ExplicitVRLittleEndian}"}).status_code == 406
    frames = client.get(f"{url}/frames/1", headers={"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"})
    [(ctype, raw)] = multipart_parts(frames.headers["content-type"], frames.content)
    assert ctype.endswith(ExplicitVRLittleEndian) and np.array_equal(np.frombuffer(raw, "<u2").reshape(32, 24), ds.pixel_array)


def test_the_console_links_a_study_to_ohif_only_when_ohif_url_is_set(site: Site) -> None:
    def study_page(settings: Settings) -> str:
        client = TestClient(create_app(settings, site.store))
        assert client.post("/api/auth/login", json={"username": "viewer", "password": site.passwords["viewer"]}).status_code == 200
        return client.get(f"/console/studies/{STUDY_A}").text

    assert "data-ohif" not in study_page(site.settings)
    page = study_page(replace(site.settings, http=replace(HttpSettings(), ohif_url="https://node.example.org/ohif/")))
    assert f'href="https://node.example.org/ohif/viewer?StudyInstanceUIDs={STUDY_A}"' in page and "Open in OHIF" in page
