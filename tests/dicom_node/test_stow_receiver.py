"""STOW-RS parts through the C-STORE rules (dicom_node.dicomweb.stow) on both stores, without HTTP:
source tokens bound to nodes, the disk watermark (503, nothing kept), durable adoption before the
answer, a part without its preamble, and the response module's failure reasons."""

from __future__ import annotations

import hashlib
import io
import uuid
from datetime import UTC, datetime
from pathlib import Path
from xml.etree import ElementTree

import pydicom
import pytest

from dicom_node.audit.atna import SourceInfo, audit_message
from dicom_node.audit.describe import sentence
from dicom_node.audit.trail import Peer, open_audit_trail
from dicom_node.dicomweb.multipart import Part
from dicom_node.dicomweb.stow import StowReceiver
from dicom_node.ops.source_tokens import SourceTokenRefused, create_source_token, source_for_token
from dicom_node.settings import Settings
from dicom_node.store.base import RemoteNode, Store
from dicom_node.store.spool import prepare_spool, temp_dir
from tests.dicom_node.test_spool import OsCallRecorder, assert_durably_written
from tests.support.atna_schema import audit_message_errors
from tests.support.corpus import synthetic_cr
from tests.support.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)
from tests.support.stores import store, store_url  # noqa: F401 (fixtures)

SOURCE = RemoteNode("modality", "MODALITY", "*", 104, role="source")


def receiver(tmp_path: Path, store: Store, **storage: object) -> StowReceiver:
    settings = Settings().with_overrides(storage={"data_dir": tmp_path / "var", "min_free_bytes": 0, **storage})
    prepare_spool(settings.storage.spool_dir)
    return StowReceiver(settings, store, open_audit_trail(store, None))


def as_part(receiver: StowReceiver, content: bytes) -> Part:
    path = temp_dir(receiver.spool_dir) / f"stow-{uuid.uuid4().hex[:16]}.part"
    path.write_bytes(content)
    return Part({"content-type": "application/dicom"}, path, len(content), hashlib.sha256(content).hexdigest())


def part10(ds: pydicom.Dataset, preamble: bool = True) -> bytes:
    buffer = io.BytesIO()
    if preamble:
        ds.save_as(buffer, enforce_file_format=True)
    else:
        pydicom.dcmwrite(buffer, ds)  # what dicomweb-client sends for a data set made in memory: meta, no preamble
    return buffer.getvalue()


def study(count: int) -> list[pydicom.Dataset]:
    uid = f"2.25.{uuid.uuid4().int % 10**30}"
    return [synthetic_cr(uid, f"{uid}.2.{i + 1}", seed=i) for i in range(count)]


def test_source_tokens_bind_to_a_source_and_die_with_it(store: Store) -> None:
    store.add_remote_node(SOURCE)
    store.add_remote_node(RemoteNode("pacs", "PACS", "127.0.0.1", 104, role="destination"))
    secret, token = create_source_token(store, "modality", "site A")
    assert secret.startswith("axs_") and token.node_name == "modality" and token.last_used_at is None
    assert secret not in repr(store.list_source_tokens())  # only the hash is kept
    node, _ = source_for_token(store, secret)
    assert node is not None and node.name == "modality"
    assert store.list_source_tokens("modality")[0].last_used_at is not None
    with pytest.raises(SourceTokenRefused, match="only be bound to a source"):
        create_source_token(store, "pacs", "x")
    with pytest.raises(SourceTokenRefused, match="no remote node"):
        create_source_token(store, "nobody", "x")
    assert source_for_token(store, "axn_an-account-token")[0] is None
    assert store.revoke_source_token(token.id, datetime.now(UTC)) and not store.revoke_source_token(token.id, datetime.now(UTC))
    assert source_for_token(store, secret) == (None, "the source token is unknown or revoked")
    second, _ = create_source_token(store, "modality", "site B")
    store.remove_remote_node("modality")
    assert store.list_source_tokens() == [] and source_for_token(store, second)[0] is None


def test_parts_are_stored_durably_before_the_answer_and_the_tmp_is_left_empty(
    tmp_path: Path,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store.add_remote_node(SOURCE)
    stow = receiver(tmp_path, store)
    datasets = study(2)
    calls = OsCallRecorder(stow.spool_dir).install(monkeypatch)
    parts = [as_part(stow, part10(datasets[0])), as_part(stow, part10(datasets[1], preamble=False))]
    result = stow.store_parts(SOURCE, "10.0.0.7", parts, datasets[0].StudyInstanceUID)
    assert result.http_status == 200 and result.received == 2
    rows = store.list_instances(datasets[0].StudyInstanceUID)
    assert len(rows) == 2 and {r.calling_ae for r in rows} == {"MODALITY"}
    for row in rows:
        assert_durably_written(calls, stow.spool_dir, row.path, row.size, new_study_dir=row is rows[0])
        read_back = pydicom.dcmread(stow.spool_dir / row.path)  # no force: the missing preamble was added
        assert read_back.SOPInstanceUID == row.sop_instance_uid
    assert list(temp_dir(stow.spool_dir).iterdir()) == []
    response = result.response("http://node/dicomweb", None)
    assert response.RetrieveURL == f"http://node/dicomweb/studies/{datasets[0].StudyInstanceUID}" and len(response.ReferencedSOPSequence) == 2


def test_below_the_watermark_nothing_is_kept_and_the_answer_is_503(tmp_path: Path, store: Store) -> None:
    store.add_remote_node(SOURCE)
    stow = receiver(tmp_path, store, min_free_bytes=2**62)
    datasets = study(2)
    result = stow.store_parts(SOURCE, None, [as_part(stow, part10(ds)) for ds in datasets], None)
    assert result.http_status == 503 and result.out_of_resources == 2
    assert [item.FailureReason for item in result.response("http://node/dicomweb", None).FailedSOPSequence] == [0xA700, 0xA700]
    assert store.list_instances(datasets[0].StudyInstanceUID) == []
    assert list(stow.spool_dir.rglob("*.dcm")) == [] and list(temp_dir(stow.spool_dir).iterdir()) == []
    (event,) = store.list_audit_events(event="stow_request")
    assert event.calling_ae == "MODALITY" and event.detail["out_of_resources"] == 2 and event.detail["source"] == "modality"


def test_a_part_in_a_syntax_the_node_does_not_accept_or_of_another_media_type_is_refused(tmp_path: Path, store: Store) -> None:
    store.add_remote_node(SOURCE)
    stow = receiver(tmp_path, store)
    ds = study(1)[0]
    private = part10(ds).replace(b"1.2.840.10008.1.2.1\x00", b"1.2.3.4.5.6.7.8.9.1\x00", 1)
    xml = as_part(stow, b"<NativeDicomModel/>")
    xml.headers["content-type"] = "application/dicom+xml"
    result = stow.store_parts(SOURCE, None, [as_part(stow, private), xml], None)
    assert result.http_status == 409 and result.refused == 2
    assert "transfer syntax '1.2.3.4.5.6.7.8.9.1' is not one the node accepts" in result.outcomes[0].reason
    assert "not application/dicom" in result.outcomes[1].reason
    assert list(temp_dir(stow.spool_dir).iterdir()) == []


def test_stow_requests_read_as_words_and_as_valid_dicom_audit_messages(tmp_path: Path, store: Store) -> None:
    store.add_remote_node(SOURCE)
    stow = receiver(tmp_path, store)
    datasets = study(2)
    stow.store_parts(SOURCE, "10.0.0.7", [as_part(stow, part10(datasets[0])), as_part(stow, b"not dicom")], None)
    stow.audit.record("stow_request", Peer("MODALITY", None, "10.0.0.7"), source="modality", received=0, refused_request=413, reason="over the cap")
    stored, refused = sorted(store.list_audit_events(event="stow_request"), key=lambda e: bool(e.detail.get("refused_request")))
    assert sentence(stored) == "STOW-RS request from MODALITY@10.0.0.7 (source modality): 1 image, 1 refused."
    assert sentence(refused) == "STOW-RS request from MODALITY@10.0.0.7 (source modality) refused with HTTP 413: over the cap."
    info = SourceInfo(audit_source_id="ANATOMIX", ae_title="ANATOMIX", hostname="node.example", enterprise_site_id="SITE-1")
    for event, code, outcome in ((stored, "110104", "0"), (refused, "110113", "4")):  # Instances Transferred; Security Alert
        xml, _ = audit_message(event, info, lambda uid: None)
        assert audit_message_errors(xml) == [], xml.decode()
        root = ElementTree.fromstring(xml)
        assert root.find("EventIdentification/EventID").get("csd-code") == code
        assert root.find("EventIdentification").get("EventOutcomeIndicator") == outcome
