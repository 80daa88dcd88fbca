"""One destination down, another up, with real node processes (embedded: serve + its own workers):
the study is not failed because of the one that is down, the retry log names the study and counts
attempts in order, and the dead letter names the destination and its reason once (issue 9 item 7)."""

from __future__ import annotations

import json
import re
import subprocess

import pydicom
import pytest

from dicom_node.cli.processes import node_command
from dicom_node.store.base import RemoteNode
from tests.support.net import free_port
from tests.support.receivers import StorageReceiver
from tests.support.workers import REPO, NodeSite, make_chest_studies, storescu

pytestmark = pytest.mark.slow

#: Only keys every version of the node knows, so the same site runs on the code before the fix.
#: max_attempts 4 ends retrying quickly here; the retry window (24 h by default) is the real limit.
OUTAGE = {"model": {"tasks": ["anatomy_grounding"]}, "delivery": {"max_attempts": 4, "backoff_base_s": 0.2, "backoff_max_s": 0.5}}


def test_one_destination_down_does_not_fail_the_study_the_other_got(tmp_path):
    site = NodeSite(tmp_path / "site", overrides=OUTAGE)
    up = StorageReceiver("127.0.0.1", "PACS_UP")
    site.add_remote(RemoteNode("modality", "MODALITY", "127.0.0.1", 104, role="source"))
    site.add_remote(RemoteNode("pacs-up", "PACS_UP", "127.0.0.1", up.port, role="destination", profile="sr-only", default_destination=True))
    site.add_remote(RemoteNode("pacs-down", "PACS_DOWN", "127.0.0.1", free_port(), role="destination", profile="sr-only",
                               default_destination=True))  # fmt: skip
    [path] = make_chest_studies(tmp_path / "studies", 1)
    study_uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    try:
        site.serve()
        storescu(site.port, site.ae_title, [path])
        [study] = site.wait_for(lambda s: bool(s) and s[0].state in ("done", "failed"), 300, "delivery to settle")
        store = site.store()
        try:
            produced = {o.sop_instance_uid for o in store.list_produced_objects(study_uid)}
            rows = store.list_deliveries(study_uid)
        finally:
            store.close()
        assert produced and set(up.sop_instance_uids()) == produced  # the destination that was up got everything
        assert {(r.destination, r.status) for r in rows} == {("pacs-up", "sent"), ("pacs-down", "dead")}
        assert study.state == "done", study.error  # not failed: pacs-up has every result
        assert "not to pacs-down" in study.error and study.error.count("no association") == 1, study.error
        # The retry log lines name the study and count attempts in order, once each.
        log = (site.root / "serve.log").read_text(errors="replace")
        attempts = [int(n) for n in re.findall(rf"study {re.escape(study_uid)} v1: delivery to pacs-down, attempt (\d+)", log)]
        assert attempts == [1, 2, 3], attempts
        assert f"study {study_uid} v1: delivery to pacs-down dead-lettered after 4 attempts" in log
        # `studies --json` shows each destination's state.
        shown = subprocess.run(node_command("studies", "--json", "--config", str(site.config_path)), cwd=REPO,
                               capture_output=True, text=True, timeout=120)  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        [summary] = json.loads(shown.stdout)
        destinations = {d["name"]: d for d in summary["deliveries"]}
        assert destinations["pacs-up"]["sent"] == destinations["pacs-up"]["total"] == len(produced)
        assert destinations["pacs-down"]["dead"] == len(produced)
    finally:
        site.stop()
        up.stop()
