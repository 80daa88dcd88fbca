"""The admin's recovery commands as real ``anatomix-node`` processes: ``resend`` (one study and the bulk
form) keeps the stage history append-only and is audited; ``reanalyze`` (one study and the bulk
form) analyses studies received before a model was configured, and reopens studies that already
have results only when asked (issue 9 items 2 and 8)."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node.cli.processes import node_command
from dicom_node.pipeline.delivery import deliver_study_version
from dicom_node.store.base import RemoteNode
from tests.integration.test_delivery import seed_study, to_comprehensive
from tests.support.receivers import StorageReceiver
from tests.support.workers import REPO, NodeSite, make_chest_studies, storescu


def node(site: NodeSite, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(node_command(*args, "--config", str(site.config_path)), cwd=REPO, capture_output=True, text=True, timeout=180)


def studies_json(site: NodeSite) -> dict[str, dict]:
    shown = node(site, "studies", "--json")
    assert shown.returncode == 0, shown.stderr
    return {s["study_instance_uid"]: s for s in json.loads(shown.stdout)}


def test_resend_appends_to_the_history_and_is_audited_one_study_and_bulk(tmp_path):
    audit_file = tmp_path / "audit.jsonl"
    site = NodeSite(tmp_path / "site", demo_weights=False, overrides={"logging": {"audit_file": str(audit_file)}})
    pacs = StorageReceiver("127.0.0.1", "PACS")
    site.add_remote(RemoteNode("pacs", "PACS", "127.0.0.1", pacs.port, role="destination", profile="sr-only", default_destination=True))
    store = site.store()
    uids = [generate_uid(), generate_uid()]
    try:
        for uid in uids:  # two studies delivered once, the normal way
            seed_study(store, site.settings, uid, 2)
            summary = deliver_study_version(store, site.settings, store.get_study(uid), fallback=to_comprehensive)
            assert summary.finished and not summary.errors
            assert store.transition_study(uid, 1, ("delivering",), "done")
        first_times = {uid: dict(store.get_study(uid).state_times) for uid in uids}
    finally:
        store.close()
    try:
        resent = node(site, "resend", uids[0])
        assert resent.returncode == 0, resent.stderr
        shown = studies_json(site)[uids[0]]
        stages = [(st["state"], st["entered_at"]) for st in shown["stages"]]
        first = first_times[uids[0]]
        # The first delivery's stages keep their times; the resend's come after them.
        assert ("delivering", first["delivering"].isoformat()) in stages and ("done", first["done"].isoformat()) in stages, stages
        assert [state for state, _ in stages][-4:] == ["delivering", "done", "delivering", "done"], stages
        history = [(h["state"], h["entered_at"]) for h in shown["history"]]
        assert history[:-2] == stages[:-2] and [state for state, _ in history[-2:]] == ["delivering", "done"]
        assert "pacs: 2/2 sent" in resent.stdout

        since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
        bulk = node(site, "resend", "--state", "done", "--since", since)
        assert bulk.returncode == 0, bulk.stderr
        assert all(f"{uid}  pacs: 2/2 sent" in bulk.stdout for uid in uids)
        # Each object reached the PACS once per send, always under its own UID (one copy there).
        assert len(pacs.sop_instance_uids()) == 2 * 2 + 2 + 2 * 2 and len(set(pacs.sop_instance_uids())) == 4
        store = site.store()
        try:
            events = store.list_audit_events("study_resent")
        finally:
            store.close()
        assert sorted(e.study_instance_uid for e in events) == sorted([uids[0], uids[0], uids[1]])
        assert all(e.detail["destinations"] == ["pacs"] and e.detail["user"] for e in events)
        assert sorted(e.detail["bulk"] for e in events) == [False, True, True]
        lines = [json.loads(line) for line in audit_file.read_text().splitlines()]
        assert sorted(line["study_instance_uid"] for line in lines if line["event"] == "study_resent") == sorted([uids[0], uids[0], uids[1]])

        nothing = node(site, "resend", "--state", "failed")
        assert (nothing.returncode, nothing.stdout.strip()) == (0, "no study matches")
        bad = node(site, "resend", uids[0], "--state", "done")
        assert bad.returncode != 0 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    finally:
        pacs.stop()


@pytest.mark.slow
def test_reanalyze_studies_received_before_a_model_was_configured(tmp_path):
    site = NodeSite(tmp_path / "site", demo_weights=False, overrides={"model": {"tasks": ["anatomy_grounding"]}})
    pacs = StorageReceiver("127.0.0.1", "PACS")
    site.add_remote(RemoteNode("modality", "MODALITY", "127.0.0.1", 104, role="source"))
    site.add_remote(RemoteNode("pacs", "PACS", "127.0.0.1", pacs.port, role="destination", profile="sr-only", default_destination=True))
    files = make_chest_studies(tmp_path / "studies", 2)
    first, second = (str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in files)
    try:
        site.serve()
        storescu(site.port, site.ae_title, files)
        site.wait_for(lambda s: len(s) == 2 and all(x.state == "failed" for x in s), 120, "both studies refused: no model")
        refused = node(site, "reanalyze", first)
        assert refused.returncode != 0 and "nothing can be analysed" in refused.stderr and "Traceback" not in refused.stderr

        # The admin configures a model and starts a worker for it.
        text = site.config_path.read_text()
        site.config_path.write_text(text.replace("demo_weights = false", "demo_weights = true"))
        site.worker("analyze", name="worker-analyze")
        one = node(site, "reanalyze", first)
        assert one.returncode == 0, one.stderr
        assert f"{first}: queued for analysis as v1" in one.stdout
        bulk = node(site, "reanalyze", "--state", "failed", "--since", "2020-01-01")
        assert bulk.returncode == 0, bulk.stderr
        assert f"{second}: queued for analysis as v1" in bulk.stdout and first not in bulk.stdout
        studies = site.wait_for(lambda s: len(s) == 2 and all(x.state in ("done",) for x in s), 300, "both studies analysed and delivered")
        assert {s.version for s in studies} == {1}

        # Results exist now: a reanalysis (e.g. for a new model) happens only when asked, as a new version.
        again = node(site, "reanalyze", first)
        assert again.returncode != 0 and "--new-version" in again.stderr and len(again.stderr.strip().splitlines()) == 1
        store = site.store()
        try:
            v1_objects = {o.sop_instance_uid for o in store.list_produced_objects(first, 1)}
        finally:
            store.close()
        renewed = node(site, "reanalyze", first, "--new-version")
        assert renewed.returncode == 0, renewed.stderr
        assert f"{first}: queued for analysis as v2 (new version)" in renewed.stdout
        site.wait_for(lambda s: any(x.study_instance_uid == first and x.version == 2 and x.state == "done" for x in s), 300, "v2 done")
        store = site.store()
        try:
            v2_objects = {o.sop_instance_uid for o in store.list_produced_objects(first, 2)}
            events = store.list_audit_events("study_reanalysis_requested")
        finally:
            store.close()
        assert v2_objects and not v2_objects & v1_objects  # a new version: new UIDs, the old results untouched
        assert set(pacs.sop_instance_uids()) >= v1_objects | v2_objects
        assert sorted((e.study_instance_uid, e.detail["version"], e.detail["new_version"]) for e in events) == sorted(
            [(first, 1, False), (second, 1, False), (first, 2, True)]
        )
    finally:
        site.stop()
        pacs.stop()
