"""Studies as the node holds them, for the DICOMweb read tests: a source image durably in the spool
(``write_instance``) and recorded (``record_instance``), and the result objects sr_writer builds for it
written under ``storage.results_dir`` and recorded as produced objects, as the analyze task does."""

from __future__ import annotations

import email
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

import httpx
import pydicom

from dicom_node.settings import Settings
from dicom_node.store.base import InstanceRecord, ProducedObject, Store
from dicom_node.store.spool import prepare_spool, write_instance
from sr_writer.bundle import SEND_ORDER, assemble_bundle
from tests.support.results import make_result

UID_ROOT = "1.2.826.0.1.3680043.10.1431."


@dataclass
class HeldStudy:
    study_instance_uid: str
    #: The received instances, as sent.
    sources: list[pydicom.Dataset]
    #: kind -> the result object as written.
    results: dict[str, pydicom.Dataset]

    def series_of(self, kind: str) -> str:
        return str(self.results[kind].SeriesInstanceUID)


def part10(ds: pydicom.Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def receive(store: Store, settings: Settings, ds: pydicom.Dataset, calling_ae: str = "MODALITY") -> InstanceRecord:
    """Spool and record one instance as the SCP does."""
    prepare_spool(settings.storage.spool_dir)
    data = part10(ds)
    study, sop = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
    spooled = write_instance(settings.storage.spool_dir, study, sop, [data], fsync=False)
    record = InstanceRecord(sop, str(ds.SOPClassUID), study, str(ds.SeriesInstanceUID), str(ds.file_meta.TransferSyntaxUID), spooled.relative_path,
                            spooled.size, spooled.sha256, calling_ae, datetime.now(UTC))  # fmt: skip
    return store.record_instance(record).instance


def hold_study(store: Store, settings: Settings, sources: list[pydicom.Dataset], n_findings: int = 2,
               kinds: tuple[str, ...] = SEND_ORDER) -> HeldStudy:  # fmt: skip
    """The sources received, and the results of the first one produced (version 1)."""
    for ds in sources:
        receive(store, settings, ds)
    first = sources[0]
    study = str(first.StudyInstanceUID)
    bundle = assemble_bundle(first, make_result(first, n_findings=n_findings), kinds, uid_root=UID_ROOT, analysis_version=1,
                             institution_name="Test Hospital")  # fmt: skip
    folder = settings.storage.results_dir / study / "v1"
    folder.mkdir(parents=True, exist_ok=True)
    results = {}
    for obj in bundle.objects:
        path: Path = folder / f"{obj.kind}.dcm"
        obj.dataset.save_as(path, enforce_file_format=True)
        store.record_produced_object(ProducedObject(study, 1, str(first.SOPInstanceUID), obj.kind, str(obj.dataset.SOPInstanceUID),
                                                    str(obj.dataset.SOPClassUID), str(path.relative_to(settings.storage.results_dir)),
                                                    datetime.now(UTC)))  # fmt: skip
        results[obj.kind] = obj.dataset
    previous = "receiving"
    for state in ("stable", "queued", "analyzing", "analyzed", "delivering", "done"):  # as the pipeline would
        assert store.transition_study(study, 1, (previous,), state)
        previous = state
    return HeldStudy(study, sources, results)


class ServedApp:
    """An ASGI application under uvicorn in a thread, on a free port (a real HTTP peer for real clients)."""

    def __init__(self, app: object, port: int) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.base = f"http://127.0.0.1:{port}"

    def __enter__(self) -> ServedApp:
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.base + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError("uvicorn did not answer within 30 s")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def multipart_parts(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """(Content-Type, bytes) of each part of a multipart body, parsed by the standard library's MIME parser."""
    message = email.message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    assert message.is_multipart(), content_type
    return [(str(part["Content-Type"]), part.get_payload(decode=True)) for part in message.get_payload()]
