"""`anatomix-node demo` without --out: it says where its results are, removes its node's working data,
and gives the image size as width x height (columns x rows)."""

from __future__ import annotations

import os
import subprocess

import pydicom
from pydicom.data import get_testdata_file

from dicom_node.cli.processes import node_command
from tests.support.workers import REPO


def test_demo_in_a_temporary_folder_tidies_up_and_says_where_the_results_are(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANATOMIX_")}
    done = subprocess.run(node_command("demo"), cwd=REPO, capture_output=True, text=True, timeout=240, env={**env, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr
    [folder] = tmp_path.glob("anatomix-demo-*")
    assert not (folder / "node-data").exists()  # spool copy, database, broker files: gone
    assert (folder / "preview.png").is_file() and list((folder / "received").glob("*.dcm"))
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith(f"Removed the demo node's working data; the results stay in {folder} (") and last.endswith("delete it when done")
    source = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    assert source.Columns != source.Rows
    assert f"{source.Columns} x {source.Rows} pixels, width x height" in done.stdout
