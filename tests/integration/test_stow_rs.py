"""STOW-RS receive (issue 23) on a real ``anatomix-node serve`` with PostgreSQL, over real HTTP.

A sender with a token bound to a source node stores by dicomweb-client (the highdicom authors'
client) and lands exactly where a C-STORE from that node lands: the spool, the study's source,
the audit and the metrics under the node's AE title. Bad input gets a problem and loses nothing
else: a wrong content type, a truncated body, a part that is not DICOM, an unknown token, and a
2 GB study that the request cap refuses after a small part of it was sent.
"""

from __future__ import annotations

import io
import socket
import time
import uuid
from collections.abc import Iterator

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from requests import HTTPError

from dicom_node.ops.source_tokens import create_source_token
from dicom_node.store.base import RemoteNode
from tests.support.api import api_node, http_url, make_accounts, wait_for_http
from tests.support.corpus import synthetic_cr
from tests.support.node import NodeProcess
from tests.support.postgres import PostgresServer, postgres_server  # noqa: F401 (fixture)

MiB = 1024 * 1024
REQUEST_CAP = 8 * MiB
BOUNDARY = "test-stow-boundary"


class Site:
    def __init__(self, node: NodeProcess, token: str, admin_token: str, destination_token: str, release_token: str) -> None:
        self.node, self.token, self.admin_token, self.destination_token = node, token, admin_token, destination_token
        self.release_token = release_token
        self.url = http_url(node)

    def dicomweb(self, token: str | None = None) -> DICOMwebClient:
        return DICOMwebClient(self.url + "/dicomweb", headers={"Authorization": f"Bearer {token or self.token}"})

    def post(self, body: bytes | Iterator[bytes], token: str | None = None, content_type: str | None = None, path: str = "/dicomweb/studies",
             **headers: str) -> httpx.Response:  # fmt: skip
        content_type = content_type or f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
        all_headers = {"Authorization": f"Bearer {token or self.token}", "Content-Type": content_type, **headers}
        return httpx.post(self.url + path, content=body, headers=all_headers, timeout=60)

    def instance_rows(self, study_uid: str) -> list:
        store = self.node.open_store()
        try:
            return store.list_instances(study_uid)
        finally:
            store.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, postgres_server: PostgresServer) -> Iterator[Site]:
    database = postgres_server.create_database()
    node = api_node(tmp_path_factory.mktemp("stow") / "node", database_url=database, settings={"http": {"stow_max_request_bytes": REQUEST_CAP}})
    node.write_config()
    store = node.open_store()
    try:
        store.add_remote_node(RemoteNode("modality", "MODALITY", "*", 104, role="source"))
        store.add_remote_node(RemoteNode("pacs", "PACS", "127.0.0.1", 104, role="destination"))
        token, _ = create_source_token(store, "modality", "tests")
        store.add_remote_node(RemoteNode("former-source", "FORMER", "*", 104, role="source"))
        destination_token, _ = create_source_token(store, "former-source", "tests")
        store.update_remote_node(RemoteNode("former-source", "FORMER", "*", 104, role="destination"))
        store.add_remote_node(RemoteNode("gateway", "GATEWAY", "*", 104, role="source", complete_on_release=True))
        release_token, _ = create_source_token(store, "gateway", "tests")
    finally:
        store.close()
    accounts = make_accounts(node, ("admin",))
    node.start()
    try:
        wait_for_http(node)
        yield Site(node, token, accounts.tokens["admin"], destination_token, release_token)
    finally:
        node.stop()
        postgres_server.drop_database(database)


def short_uid() -> str:
    """A UID that leaves room for instance suffixes within 64 characters."""
    return f"2.25.{uuid.uuid4().int % 10**30}"


def instances(count: int, study_uid: str | None = None) -> list[pydicom.Dataset]:
    study_uid = study_uid or short_uid()
    return [synthetic_cr(study_uid, f"{study_uid}.2.{i + 1}", seed=i) for i in range(count)]


def part10(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def multipart(contents: list[bytes], content_type: str = "application/dicom") -> bytes:
    out = b""
    for content in contents:
        out += b"--" + BOUNDARY.encode() + f"\r\nContent-Type: {content_type}\r\n\r\n".encode() + content + b"\r\n"
    return out + b"--" + BOUNDARY.encode() + b"--\r\n"


def assert_problem(response: httpx.Response, status: int, words: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/problem+json", response.headers
    body = response.json()
    assert body["status"] == status and words in body["detail"], body
    return body


def nothing_left_in_tmp(node: NodeProcess) -> None:
    assert [p.name for p in node.temp_files()] == []


def test_dicomweb_client_stores_a_study_as_the_source_its_token_is_bound_to(site: Site) -> None:
    datasets = instances(3)
    study = datasets[0].StudyInstanceUID
    answer = site.dicomweb().store_instances(datasets)
    assert [item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence] == [ds.SOPInstanceUID for ds in datasets]
    assert "FailedSOPSequence" not in answer and answer.RetrieveURL.endswith(f"/dicomweb/studies/{study}")
    first = answer.ReferencedSOPSequence[0]
    assert first.RetrieveURL.endswith(f"/dicomweb/studies/{study}/series/{datasets[0].SeriesInstanceUID}/instances/{datasets[0].SOPInstanceUID}")
    rows = site.instance_rows(study)
    assert sorted(r.sop_instance_uid for r in rows) == sorted(ds.SOPInstanceUID for ds in datasets)
    assert {r.calling_ae for r in rows} == {"MODALITY"}
    for row, ds in zip(sorted(rows, key=lambda r: r.sop_instance_uid), sorted(datasets, key=lambda d: d.SOPInstanceUID), strict=True):
        stored = pydicom.dcmread(site.node.spool_dir / row.path)
        assert stored.SOPInstanceUID == ds.SOPInstanceUID and stored.PixelData == ds.PixelData
    store = site.node.open_store()
    try:
        study_row = store.get_study(study)
        assert study_row is not None and study_row.source_node == "modality" and study_row.source_ae == "MODALITY"
        events = [e for e in store.list_audit_events(event="stow_request", limit=50) if study in e.detail.get("studies", [])]
    finally:
        store.close()
    assert len(events) == 1 and events[0].calling_ae == "MODALITY" and events[0].detail["received"] == 3
    assert events[0].detail["source"] == "modality" and events[0].peer_host == "127.0.0.1"
    # The same study again: duplicates, acknowledged (200) and not stored twice, as for C-STORE.
    again = site.dicomweb().store_instances(datasets, study_instance_uid=study)
    assert len(again.ReferencedSOPSequence) == 3 and len(site.instance_rows(study)) == 3
    nothing_left_in_tmp(site.node)


def test_a_complete_on_release_source_has_its_study_complete_when_its_request_ends(site: Site) -> None:
    datasets = instances(2)
    site.dicomweb(site.release_token).store_instances(datasets)
    store = site.node.open_store()
    try:
        study = store.get_study(datasets[0].StudyInstanceUID)
    finally:
        store.close()
    # Closed before the answer (the node's quiet period is 2 s): as a C-STORE association's release does.
    assert study is not None and study.state != "receiving" and study.source_node == "gateway"


def test_the_metrics_count_stow_under_the_sources_ae_title(site: Site) -> None:
    site.dicomweb().store_instances(instances(2))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = httpx.get(site.url + "/metrics").text
        received = [line for line in metrics.splitlines() if line.startswith('anatomix_instances_received_total{calling_ae="MODALITY"}')]
        if received and float(received[0].split()[-1]) >= 2:
            return
        time.sleep(0.2)
    raise AssertionError(f"no STOW-RS count under MODALITY in /metrics: {[m for m in metrics.splitlines() if 'received' in m]}")


def test_a_part_that_is_not_dicom_fails_alone_with_its_reason(site: Site) -> None:
    good = instances(1)[0]
    response = site.post(multipart([part10(good), b"this is not DICOM at all" * 20]))
    assert response.status_code == 202 and response.headers["content-type"] == "application/dicom+json"
    body = pydicom.Dataset.from_json(response.json())
    assert [i.ReferencedSOPInstanceUID for i in body.ReferencedSOPSequence] == [good.SOPInstanceUID]
    (failed,) = body.FailedSOPSequence
    assert failed.FailureReason == 0xC000 and "not a DICOM Part 10 file" in response.headers["warning"]
    assert len(site.instance_rows(good.StudyInstanceUID)) == 1
    # Every part bad: 409, nothing stored.
    damaged = part10(instances(1)[0])[:-500]  # pixel data cut short: the header walk refuses it
    response = site.post(multipart([damaged, b"\x00" * 200]))
    assert response.status_code == 409
    reasons = [item.FailureReason for item in pydicom.Dataset.from_json(response.json()).FailedSOPSequence]
    assert reasons == [0xC000, 0xC000] and "damaged" in response.headers["warning"]
    nothing_left_in_tmp(site.node)


def test_the_study_url_refuses_an_instance_of_another_study(site: Site) -> None:
    ds = instances(1)[0]
    other = short_uid()
    with pytest.raises(HTTPError) as caught:
        site.dicomweb().store_instances([ds], study_instance_uid=other)
    assert caught.value.response.status_code == 409
    (failed,) = pydicom.Dataset.from_json(caught.value.response.json()).FailedSOPSequence
    assert failed.FailureReason == 0xA900 and failed.ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert site.instance_rows(ds.StudyInstanceUID) == []


@pytest.mark.parametrize(
    ("content_type", "status", "words"),
    [
        ("application/dicom", 415, "not multipart/related"),
        ('multipart/related; type="application/dicom+json"; boundary=' + BOUNDARY, 415, "application/dicom+json"),
        ('multipart/related; type="application/dicom"', 400, "boundary"),
    ],
)
def test_a_wrong_content_type_is_a_problem(site: Site, content_type: str, status: int, words: str) -> None:
    ds = instances(1)[0]
    assert_problem(site.post(multipart([part10(ds)]), content_type=content_type), status, words)
    assert site.instance_rows(ds.StudyInstanceUID) == []


def test_a_truncated_body_keeps_nothing_not_even_its_complete_parts(site: Site) -> None:
    datasets = instances(3)
    body = multipart([part10(ds) for ds in datasets])
    assert_problem(site.post(body[: len(body) - 2000]), 400, "truncated")
    assert site.instance_rows(datasets[0].StudyInstanceUID) == []
    nothing_left_in_tmp(site.node)


@pytest.mark.parametrize(
    ("which", "words"),
    [("unknown", "unknown or revoked"), ("account", "not a source token"), ("destination", "no longer a source"), ("none", "needs a source token")],
)
def test_a_token_that_is_not_a_sources_is_refused(site: Site, which: str, words: str) -> None:
    token = {"unknown": "axs_no-such-token", "account": site.admin_token, "destination": site.destination_token, "none": ""}[which]
    ds = instances(1)[0]
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    response = httpx.post(site.url + "/dicomweb/studies", content=multipart([part10(ds)]), headers=headers)
    body = assert_problem(response, 401, words)
    assert body["title"] == "Unauthorized" and response.headers["connection"] == "close"  # the body is not read
    assert site.instance_rows(ds.StudyInstanceUID) == []


def test_source_tokens_are_made_listed_and_revoked_by_an_admin(site: Site) -> None:
    admin = httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {site.admin_token}"}, timeout=30)
    created = admin.post("/api/nodes/modality/tokens", json={"label": "second sender"})
    assert created.status_code == 201 and created.json()["token"].startswith("axs_")
    token, token_id = created.json()["token"], created.json()["id"]
    assert token_id in [t["id"] for t in admin.get("/api/nodes/modality/tokens").json()]
    assert "token" not in admin.get("/api/nodes/modality/tokens").json()[0]
    assert_problem(admin.post("/api/nodes/pacs/tokens", json={"label": "x"}), 409, "only be bound to a source")
    ds = instances(1)[0]
    assert site.post(multipart([part10(ds)]), token=token).status_code == 200
    assert admin.delete(f"/api/nodes/modality/tokens/{token_id}").status_code == 204
    assert_problem(site.post(multipart([part10(instances(1)[0])]), token=token), 401, "unknown or revoked")


def generated_study(total: int, chunk: int = MiB) -> tuple[Iterator[bytes], list[int]]:
    """A 2 GB study as a sender streams it (chunked: no Content-Length), generated as it is sent."""
    sent = [0]

    def chunks() -> Iterator[bytes]:
        header = part10(instances(1)[0])
        block = b"\x00" * chunk
        first = b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + header
        sent[0] += len(first)
        yield first
        while sent[0] < total:
            sent[0] += len(block)
            yield block

    return chunks(), sent


def test_a_2gb_study_is_refused_at_the_request_cap_without_being_sent_whole(site: Site) -> None:
    stream, sent = generated_study(2 * 1024**3)
    response = site.post(stream)
    assert_problem(response, 413, "over the size cap")
    assert sent[0] < 64 * MiB, f"{sent[0]} bytes were sent before the refusal"
    nothing_left_in_tmp(site.node)
    # Declared up front: refused before the body is read (a raw socket: HTTP clients will not lie about the length).
    host, port = site.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        raw.sendall(
            f"POST /dicomweb/studies HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {site.token}\r\n"
            f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}\r\n'
            f"Content-Length: {2 * 1024**3}\r\n\r\n--{BOUNDARY}\r\n".encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = raw.recv(65536)
            if not chunk:
                break
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] == b"413", answer[:500]
    assert b"declares 2147483648 bytes" in rest and b"connection: close" in rest.lower()
    # The node goes on storing after both.
    assert site.post(multipart([part10(instances(1)[0])])).status_code == 200
