"""With no model configured the node still receives and stores, and says why it did not analyse."""

from __future__ import annotations

import subprocess

from pydicom.data import get_testdata_file

from dicom_node.cli.processes import node_command
from dicom_node.pipeline.dispatch import NO_MODEL_ERROR
from dicom_node.store.base import RemoteNode
from tests.support.workers import REPO, NodeSite

RG1 = get_testdata_file("RG1_UNCR.dcm")


def test_no_model_receives_stores_and_refuses_to_analyse(tmp_path):
    site = NodeSite(tmp_path / "site", demo_weights=False)
    site.add_remote(RemoteNode("modality", "MODALITY", "127.0.0.1", 104, role="source"))
    try:
        site.serve()
        sent = subprocess.run(
            ["storescu", "-aet", "MODALITY", "-aec", site.ae_title, "127.0.0.1", str(site.port), RG1],
            env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        [study] = site.wait_for(lambda s: bool(s) and s[0].state == "failed", 60, "the study to be refused")
        assert study.error == NO_MODEL_ERROR
        store = site.store()
        try:
            [instance] = store.list_instances(study.study_instance_uid)
            assert (site.settings.storage.spool_dir / instance.path).is_file()  # stored all the same
        finally:
            store.close()
    finally:
        site.stop()


def test_worker_refuses_analyze_queue_without_model(tmp_path):
    site = NodeSite(tmp_path / "site", demo_weights=False)
    done = subprocess.run(
        node_command("worker", "--queues", "analyze", "--config", str(site.config_path)),
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "no model configured" in done.stderr and "--demo-weights" in done.stderr
