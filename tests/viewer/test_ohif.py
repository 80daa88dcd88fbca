"""Our objects in the viewer radiologists use: OHIF 3.13 (npm dist) reading Orthanc through DICOMweb,
same origin, in Debian's headless chromium driven by playwright-core.

For a CR (MONOCHROME1, RG1's real pixels) and a DX (MONOCHROME2), each with a valid PixelSpacing
(RG1's own 0\\0 makes OHIF draw the image at zero size: the source's fault), the whole bundle goes into
Orthanc; OHIF then opens the image, the TID 1500 SR and the SEG. Judged from the screenshot pixels
(the overlay adds coloured pixels to the grey image; SEG segments in several distinct colours) and from
the browser console at every level (OHIF logs its SR crash at debug level) and the page text (no
"Something went wrong", labels that name the region with its side). Screenshots: test-output/.
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from sr_writer.bundle import SEND_ORDER, assemble_bundle
from tests.support.ohif_server import CACHE, OhifServer, install_viewer
from tests.support.orthanc import DICOMWEB_PLUGIN, Orthanc
from tests.support.results import dx_source, make_result, rg1_source

UID_ROOT = "1.2.826.0.1.3680043.10.1431."
SCRIPT = Path(__file__).with_name("ohif_check.mjs")
#: OHIF labels an SR box "<Finding Site concept code>: <site meaning>".
FINDING_SITE = "363698007"
CRASH_MARKERS = ("Something went wrong", "Cannot read properties of undefined", "TypeError")


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory):
    if shutil.which("node") is None:
        pytest.fail("node is not installed (Debian nodejs): the OHIF test drives chromium from a node script")
    dist = install_viewer()
    # Without the GDCM plugin: Orthanc core (DCMTK) decodes the SEG's JPEG-LS frames for OHIF's per-frame
    # requests. With it, the Debian GDCM plugin (1.5, gdcm 3.0.21) now and then overflows the stack of
    # Orthanc's HTTP worker thread while decoding them in parallel (a segfault in libgdcmMSFF, seen in CI).
    pacs = Orthanc(workdir=tmp_path_factory.mktemp("ohif-orthanc"), plugins=(DICOMWEB_PLUGIN,)).start()
    server = OhifServer(dist, pacs.http_port).start()
    try:
        yield pacs, server
    finally:
        server.stop()
        pacs.stop()


def cr_source() -> pydicom.Dataset:
    """RG1 (CR, MONOCHROME1) with a calibrated PixelSpacing instead of its 0\\0."""
    ds = rg1_source()
    ds.PixelSpacing = [0.171, 0.171]
    return ds


def dx_with_spacing() -> pydicom.Dataset:
    ds = dx_source()
    ds.PixelSpacing = [0.143, 0.143]
    return ds


def load_study(pacs: Orthanc, source: pydicom.Dataset, directory: Path) -> tuple[dict[str, str], int]:
    """Upload the source and its bundle; return series UID per kind ("image" for the source) and
    how many measurement groups (boxes) the TID 1500 SR holds."""
    result = make_result(source, n_findings=8)
    bundle = assemble_bundle(source, result, SEND_ORDER, uid_root=UID_ROOT, analysis_version=1)
    directory.mkdir(parents=True, exist_ok=True)
    source_path = directory / "source.dcm"
    source.save_as(source_path, enforce_file_format=True)
    assert pacs.upload(source_path)["Status"] in ("Success", "AlreadyStored")
    series = {"image": str(source.SeriesInstanceUID)}
    for built in bundle.objects:
        path = directory / f"{built.kind}.dcm"
        built.dataset.save_as(path, enforce_file_format=True)
        assert pacs.upload(path)["Status"] in ("Success", "AlreadyStored"), built.kind
        series[built.kind] = str(built.dataset.SeriesInstanceUID)
    sr = next(o.dataset for o in bundle.objects if o.kind == "sr")
    [measurements] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    return series, len(measurements.ContentSequence)


def open_in_ohif(server: OhifServer, study: str, series: str, name: str, output_dir: Path, settle_ms: int = 9000) -> tuple[np.ndarray, dict]:
    png, report = output_dir / f"ohif-{name}.png", output_dir / f"ohif-{name}.json"
    url = f"{server.url}/viewer?StudyInstanceUIDs={study}&initialSeriesInstanceUID={series}"
    env = {**os.environ, "PLAYWRIGHT_CORE_DIR": str(CACHE / "node_modules" / "playwright-core")}
    done = subprocess.run(["node", str(SCRIPT), url, str(png), str(report), str(settle_ms)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    # The viewport only (right of the study browser, below the toolbar): thumbnails are not the overlay.
    return np.asarray(Image.open(png).convert("RGB"))[60:990, 300:1350], json.loads(report.read_text())


def crash_lines(report: dict) -> list[str]:
    lines = [*report["pageErrors"], *(line for line in report["console"] if any(m in line for m in CRASH_MARKERS))]
    if "Something went wrong" in report["bodyText"]:
        lines.append("page shows 'Something went wrong'")
    return lines


def coloured_pixels(rgb: np.ndarray) -> np.ndarray:
    """Pixels that are clearly coloured (the grey radiograph and OHIF's grey UI are not)."""
    values = rgb.astype(int)
    return (values.max(axis=2) - values.min(axis=2)) > 60


def hue_clusters(rgb: np.ndarray, mask: np.ndarray) -> int:
    """How many distinct hues (in 24 bins of 15 degrees) hold at least 0.5% of the coloured pixels."""
    pixels = rgb[mask].astype(float) / 255.0
    if not len(pixels):
        return 0
    hues = np.array([colorsys.rgb_to_hsv(*p)[0] for p in pixels[:: max(1, len(pixels) // 20000)]])
    counts = np.bincount((hues * 24).astype(int) % 24, minlength=24)
    return int((counts > 0.005 * counts.sum()).sum())


@pytest.mark.parametrize("name", ["cr", "dx"])
def test_ohif_shows_the_image_sr_boxes_and_seg_segments_without_crashing(viewer, name: str, tmp_path: Path, output_dir: Path) -> None:
    pacs, server = viewer
    source = cr_source() if name == "cr" else dx_with_spacing()
    series, sr_groups = load_study(pacs, source, tmp_path / name)
    study = str(source.StudyInstanceUID)

    image, report = open_in_ohif(server, study, series["image"], f"{name}-image", output_dir)
    assert not crash_lines(report), crash_lines(report)
    grey = image[100:-100, 100:-100].astype(int)
    assert grey.std() > 20, "the radiograph is not shown (blank viewport)"
    base_colour = coloured_pixels(image).mean()

    sr, report = open_in_ohif(server, study, series["sr"], f"{name}-sr", output_dir)
    assert not crash_lines(report), crash_lines(report)
    assert coloured_pixels(sr).mean() > base_colour + 0.002, "no SR box was drawn"
    text = report["bodyText"]
    assert "Right costophrenic angle" in text or "Right lung" in text or "Left lung" in text, text[:2000]
    # One site label per box, and only the findings and the anatomy they are grounded to: 36 region
    # boxes and their labels stacked over each other buried the findings.
    assert sr_groups < 36 and text.count(f"{FINDING_SITE}: ") == sr_groups, text[-2500:]

    # OHIF 3.13's whole-instance SEG fetch rejects a pixel data length padded to even (43 frames of
    # 1955 x 1841 is odd) and falls back to one request per frame, which takes longer: wait for it.
    seg, report = open_in_ohif(server, study, series["seg"], f"{name}-seg", output_dir, settle_ms=30000)
    assert pacs.process is not None and pacs.process.poll() is None, f"Orthanc died (exit {pacs.process.returncode}) while OHIF loaded the SEG"
    assert not crash_lines(report), crash_lines(report)
    mask = coloured_pixels(seg)
    assert mask.mean() > base_colour + 0.01, "no SEG segment was drawn"
    assert hue_clusters(seg, mask) >= 5, "SEG segments are not in distinct colours"
