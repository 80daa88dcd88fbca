"""STOW-RS on a spool that is nearly full (a tiny tmpfs: the kernel's own ENOSPC): the watermark
refuses a declared body before reading it, a chunked body that fills the disk mid-stream gets 503
with nothing kept, and the node stores again as soon as the request is small enough."""

from __future__ import annotations

import io
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom

from dicom_node.ops.source_tokens import create_source_token
from dicom_node.store.base import RemoteNode
from tests.faults.test_kill_and_disk import mount_tmpfs
from tests.support.api import api_node, http_url, wait_for_http
from tests.support.corpus import synthetic_cr

BOUNDARY = "stow-disk-test"
HEADERS = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}
MiB = 1024 * 1024


def instance(rows: int) -> tuple[pydicom.Dataset, bytes]:
    study = f"2.25.{uuid.uuid4().int % 10**30}"
    ds = synthetic_cr(study, study + ".2.1", rows=rows, columns=rows)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return ds, buffer.getvalue()


def body(content: bytes) -> bytes:
    return b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + content + b"\r\n--" + BOUNDARY.encode() + b"--\r\n"


def chunked(data: bytes, chunk: int = 256 * 1024) -> Iterator[bytes]:
    for at in range(0, len(data), chunk):
        yield data[at : at + chunk]


def test_a_full_spool_refuses_stow_rs_with_503_and_keeps_nothing(tmp_path: Path) -> None:
    node = api_node(tmp_path / "node", settings={"storage": {"min_free_bytes": 5 * MiB}})
    node.write_config()
    store = node.open_store()  # the database lives beside the spool, not on the tiny file system
    try:
        store.add_remote_node(RemoteNode("modality", "MODALITY", "*", 104, role="source"))
        token, _ = create_source_token(store, "modality", "tests")
    finally:
        store.close()
    mount_tmpfs(node.spool_dir, "size=6m")
    try:
        node.start()
        try:
            wait_for_http(node)
            headers = {**HEADERS, "Authorization": f"Bearer {token}"}
            url = http_url(node) + "/dicomweb/studies"
            # Declared: 2 MiB would leave less than the 5 MiB watermark of 6: refused before reading.
            _, two_mib = instance(1024)
            declared = httpx.post(url, content=body(two_mib), headers=headers, timeout=60)
            assert declared.status_code == 503 and declared.headers["retry-after"], declared.text
            assert "free-space watermark" in declared.json()["detail"]
            # Chunked (no Content-Length): a 12 MB instance fills the disk while it is being received.
            _, twelve_mb = instance(2500)
            streamed = httpx.post(url, content=chunked(body(twelve_mb)), headers=headers, timeout=60)
            assert streamed.status_code == 503, streamed.text
            assert "could not write the request to its spool" in streamed.json()["detail"]
            assert node.temp_files() == [] and node.spooled_files() == []
            # Small enough: stored as usual.
            small, small_bytes = instance(64)
            stored = httpx.post(url, content=body(small_bytes), headers=headers, timeout=60)
            assert stored.status_code == 200, stored.text
            assert [pydicom.dcmread(p).SOPInstanceUID for p in node.spooled_files()] == [small.SOPInstanceUID]
            assert "writing the body to" in node.log_text() and "No space left on device" in node.log_text()
        finally:
            node.stop()
    finally:
        subprocess.run(["umount", str(node.spool_dir)], check=False)
