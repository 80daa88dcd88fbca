"""`anatomix-node analyze`: the same engine and writer without the network, for IT validation."""

from __future__ import annotations

import json
import subprocess

import pydicom
from pydicom.data import get_testdata_file

from dicom_node.cli.processes import node_command
from tests.support.workers import DEMO_WEIGHTS_CACHE, REPO, make_chest_studies


def test_offline_analyze_writes_objects_and_json_and_says_why_it_skipped(tmp_path):
    [chest] = make_chest_studies(tmp_path / "in", 1)
    ct = get_testdata_file("CT_small.dcm")
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    config = tmp_path / "anatomix-node.toml"
    # The demo weights cache is shared with the other pipeline tests (generated once).
    config.write_text(f'[storage]\ndata_dir = "{DEMO_WEIGHTS_CACHE.parent / "offline-data"}"\n[model]\nmax_new_tokens = 24\n')
    (DEMO_WEIGHTS_CACHE.parent / "offline-data").mkdir(parents=True, exist_ok=True)
    models = DEMO_WEIGHTS_CACHE.parent / "offline-data" / "models"
    if not models.exists():
        DEMO_WEIGHTS_CACHE.mkdir(parents=True, exist_ok=True)
        models.symlink_to(DEMO_WEIGHTS_CACHE, target_is_directory=True)
    out = tmp_path / "out"
    done = subprocess.run(
        node_command("analyze", str(tmp_path / "in"), ct, "--out", str(out), "--demo-weights", "--profile", "pacs-basic",
                     "--config", str(config)),
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "skipped" in done.stdout and "notes.txt" in done.stdout and "cannot read" in done.stdout
    assert f"skipped {ct}" in done.stdout  # a CT is not a chest radiograph: the reason is printed
    uid = str(pydicom.dcmread(chest, stop_before_pixels=True).SOPInstanceUID)
    folder = out / uid
    result = json.loads((folder / "result.json").read_text())
    assert result["sop_instance_uid"] == uid and result["model"]["demo"] is True and len(result["regions"]) == 36
    kinds = sorted(p.name.split("-")[0] for p in folder.glob("*.dcm"))
    assert kinds == ["gsps", "sc", "text_sr"]  # the pacs-basic profile
    for path in folder.glob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert "DEMO" in ds.SeriesDescription.upper()
