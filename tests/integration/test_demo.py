"""`anatomix-node demo` (what `make demo` runs): the whole loop in under 3 minutes, a preview PNG left behind."""

from __future__ import annotations

import subprocess
import time

import pydicom
from PIL import Image

from dicom_node.cli.processes import node_command
from tests.support.workers import REPO


def test_demo_runs_the_whole_loop_and_leaves_the_preview(tmp_path):
    out = tmp_path / "demo"
    started = time.monotonic()
    done = subprocess.run(node_command("demo", "--out", str(out)), cwd=REPO, capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - started
    node_log = (out / "node.log").read_text(errors="replace")[-3000:] if (out / "node.log").exists() else ""
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{node_log}"
    assert elapsed < 180, f"demo took {elapsed:.0f} s"
    preview = Image.open(out / "preview.png")
    assert preview.mode == "RGB" and min(preview.size) > 200
    received = sorted((out / "received").glob("*.dcm"))
    classes = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in received}
    assert classes == {
        "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.66.4",
        "1.2.840.10008.5.1.4.1.1.11.1", "1.2.840.10008.5.1.4.1.1.7",
    }  # fmt: skip
    assert "DEMO WEIGHTS" in done.stdout and "preview.png" in done.stdout
    assert "done" in done.stdout and "stages:" in done.stdout
    assert (out / "result.json").is_file()
