"""Routing rules with real processes: rules added with ``anatomix-node route add`` send a DX from one
source to one destination and a CR from the same source to another (real pynetdicom Storage SCPs),
nothing to the wrong one, nor to the sender or the default destination that the default would pick;
``route dry-run`` names the rule and why."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pydicom
import pytest

from dicom_node.cli.processes import node_command
from dicom_node.store.base import RemoteNode
from tests.integration.test_delivery_routing import APM_ONLY, send_from
from tests.support.receivers import StorageReceiver
from tests.support.workers import REPO, NodeSite, make_chest_studies

pytestmark = pytest.mark.slow

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.11"}


def as_dx(path: Path) -> None:
    """Turn one of the chest CR studies into a DX For Presentation image (same pixels, new class)."""
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.save_as(path, enforce_file_format=True)


def route(site: NodeSite, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANATOMIX_") or k.startswith("ANATOMIX_TEST")}
    return subprocess.run(node_command("route", *args, "--config", str(site.config_path)), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_a_dx_and_a_cr_from_one_source_go_to_their_own_destinations(tmp_path: Path) -> None:
    site = NodeSite(tmp_path / "site", overrides=APM_ONLY)
    ward, pacs_dx, pacs_cr, archive = (StorageReceiver("127.0.0.1", title) for title in ("WARD", "PACSDX", "PACSCR", "ARCHIVE"))
    # Without rules the ward (a destination too) and the archive (default destination) would get both.
    site.add_remote(RemoteNode("ward", "WARD", "127.0.0.1", ward.port, role="both", profile="full"))
    site.add_remote(RemoteNode("pacs-dx", "PACSDX", "127.0.0.1", pacs_dx.port, role="destination", profile="full"))
    site.add_remote(RemoteNode("pacs-cr", "PACSCR", "127.0.0.1", pacs_cr.port, role="destination", profile="full"))
    site.add_remote(RemoteNode("archive", "ARCHIVE", "127.0.0.1", archive.port, role="destination", default_destination=True))
    refused = route(site, "add", "dx-to-a", "--source", "ward", "--modality", "DX", "--to", "pacs-dz")
    assert refused.returncode == 2 and "action.destinations[0]" in refused.stderr and "pacs-dz" in refused.stderr, refused.stderr
    added = [route(site, "add", "cr-to-b", "--source", "ward", "--modality", "CR", "--to", "pacs-cr", "--profile", "sr-only"),
             route(site, "add", "dx-to-a", "--source", "ward", "--modality", "DX", "--to", "pacs-dx", "--position", "1")]  # fmt: skip
    assert all(r.returncode == 0 for r in added), [r.stderr for r in added]
    cr_path, dx_path = make_chest_studies(tmp_path / "studies", 2)
    as_dx(dx_path)
    study_cr = str(pydicom.dcmread(cr_path, stop_before_pixels=True).StudyInstanceUID)
    study_dx = str(pydicom.dcmread(dx_path, stop_before_pixels=True).StudyInstanceUID)
    try:
        site.serve()
        send_from("127.0.0.1", "WARD", site.port, site.ae_title, dx_path)
        send_from("127.0.0.1", "WARD", site.port, site.ae_title, cr_path)
        studies = site.wait_for(lambda s: len(s) == 2 and all(x.state in ("done", "failed") for x in s), 300, "both studies delivered")
        assert all(s.state == "done" for s in studies), [(s.state, s.error) for s in studies]
        store = site.store()
        try:
            produced = {uid: store.list_produced_objects(uid) for uid in (study_dx, study_cr)}
            deliveries = {(d.study_instance_uid, d.destination, d.status) for d in store.list_deliveries()}
        finally:
            store.close()
        dx_objects = {o.sop_instance_uid for o in produced[study_dx]}
        cr_sr = {o.sop_instance_uid for o in produced[study_cr] if o.kind in ("sr", "text_sr")}
        assert dx_objects and cr_sr
        assert set(pacs_dx.sop_instance_uids()) == dx_objects  # every DX result, in pacs-dx's own profile (full)
        assert {o.kind for o in produced[study_dx]} >= {"sr", "gsps", "sc"}  # "seg" only when a finding is located
        assert set(pacs_cr.sop_instance_uids()) == cr_sr  # the CR's results in the rule's profile: SR only
        assert {str(ds.SOPClassUID) for ds in pacs_cr.received} <= SR_CLASSES
        assert ward.sop_instance_uids() == [] and archive.sop_instance_uids() == []  # the rules replace the default
        assert {(uid, dest) for uid, dest, _ in deliveries} == {(study_dx, "pacs-dx"), (study_cr, "pacs-cr")}

        dry = route(site, "dry-run", study_cr)
        assert dry.returncode == 0, dry.stderr
        assert "rule 1 dx-to-a: no match: modality CR does not match DX (held: source ward matches ward)" in dry.stdout, dry.stdout
        assert "rule 2 cr-to-b: MATCHED: source ward matches ward; modality CR matches CR" in dry.stdout
        assert "results go to: pacs-cr (profile sr-only; rule cr-to-b)" in dry.stdout
        latest = json.loads(route(site, "dry-run", "--json").stdout)  # no UID: the latest study (the CR, sent last)
        assert latest["study"]["study_instance_uid"] == study_cr and latest["rule"] == "cr-to-b"
        dx = json.loads(route(site, "dry-run", study_dx, "--json").stdout)
        assert dx["rule"] == "dx-to-a" and [d["name"] for d in dx["destinations"]] == ["pacs-dx"]
        assert [r["outcome"] for r in dx["rules"]] == ["matched", "not reached"]
    finally:
        site.stop()
        for receiver in (ward, pacs_dx, pacs_cr, archive):
            receiver.stop()
