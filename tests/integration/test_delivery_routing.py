"""Where results go: back to the remote node that sent the study (AE title *and* host), plus the
default destinations. Real node processes, real pynetdicom senders and receivers on two loopback
addresses (issue 15 bug 2: two sources sharing one AE title on different hosts)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from dicom_node.store.base import RemoteNode
from tests.support.receivers import StorageReceiver
from tests.support.workers import NodeSite, make_chest_studies

pytestmark = pytest.mark.slow

APM_ONLY = {"model": {"tasks": ["anatomy_grounding"]}}


def send_from(host: str, calling_ae: str, port: int, called_ae: str, path: Path) -> None:
    """C-STORE one file from a given local address (pynetdicom binds the requestor socket there)."""
    ds = pydicom.dcmread(path)
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(ds.SOPClassUID, [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae, bind_address=(host, 0))
    assert assoc.is_established, f"the node refused the association from {calling_ae}@{host}"
    try:
        status = assoc.send_c_store(ds)
        assert status and status.Status == 0, status
    finally:
        assoc.release()


def test_results_go_to_the_host_that_sent_the_study_not_to_its_namesake(tmp_path):
    site = NodeSite(tmp_path / "site", overrides=APM_ONLY)
    ward_a = StorageReceiver("127.0.0.1", "MODALITY")
    ward_b = StorageReceiver("127.0.0.2", "MODALITY")
    # Two modalities configured with the same AE title on different hosts, each also a destination.
    site.add_remote(RemoteNode("ward-a", "MODALITY", "127.0.0.1", ward_a.port, role="both", profile="sr-only"))
    site.add_remote(RemoteNode("ward-b", "MODALITY", "127.0.0.2", ward_b.port, role="both", profile="sr-only"))
    from_a, from_b = make_chest_studies(tmp_path / "studies", 2)
    study_a = str(pydicom.dcmread(from_a, stop_before_pixels=True).StudyInstanceUID)
    study_b = str(pydicom.dcmread(from_b, stop_before_pixels=True).StudyInstanceUID)
    try:
        site.serve()
        send_from("127.0.0.2", "MODALITY", site.port, site.ae_title, from_b)
        send_from("127.0.0.1", "MODALITY", site.port, site.ae_title, from_a)
        studies = site.wait_for(lambda s: len(s) == 2 and all(x.state in ("done", "failed") for x in s), 300, "both studies delivered")
        assert all(s.state == "done" for s in studies), [(s.state, s.error) for s in studies]
        store = site.store()
        try:
            produced = {uid: {o.sop_instance_uid for o in store.list_produced_objects(uid)} for uid in (study_a, study_b)}
            recorded = store.list_studies()
            destinations = {(d.study_instance_uid, d.destination) for d in store.list_deliveries()}
        finally:
            store.close()
        assert produced[study_a] and produced[study_b]
        assert set(ward_a.sop_instance_uids()) == produced[study_a]  # its own results, nothing of the other ward's
        assert set(ward_b.sop_instance_uids()) == produced[study_b]
        assert destinations == {(study_a, "ward-a"), (study_b, "ward-b")}
        assert {s.study_instance_uid: s.source_node for s in recorded} == {study_a: "ward-a", study_b: "ward-b"}
    finally:
        site.stop()
        ward_a.stop()
        ward_b.stop()
