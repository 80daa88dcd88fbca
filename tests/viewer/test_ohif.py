"""Our objects in the viewer radiologists use: OHIF 3.13 (npm dist) reading Orthanc through DICOMweb,
same origin, in Debian's headless chromium driven by playwright-core.

Every result shape of ``tests/sr_writer/shapes.py`` (0, 1, many findings, a finding grounded to no
region; CR MONOCHROME1 and DX MONOCHROME2; calibrated, imager-only and no pixel spacing) goes into ONE
Orthanc with the default ``full`` profile's objects, and ONE browser opens every result series OHIF can
show (the findings SR, the findings SEG, the text SR; the image and the burned-in SC for one shape;
OHIF's basic mode does not display GSPS). 15 opens; each open fails on OHIF's error page, a page error or a
console TypeError at any level (OHIF logs its SR crash at debug level); the overlay's label texts are
counted. Screenshots: test-output/ohif-<shape>-<series>.png.
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_node.settings import DEFAULT_PROFILES
from tests.sr_writer.shapes import BuiltShape, build_shapes
from tests.support.ohif_server import CACHE, OhifServer, install_viewer
from tests.support.orthanc import DICOMWEB_PLUGIN, Orthanc

SCRIPT = Path(__file__).with_name("ohif_check.mjs")
#: OHIF labels an SR box with one line per NUM, "<name>: <value> <unit>", and one for a group-level Finding
#: Site, "<concept code>: <site>". Our finding boxes have one NUM, named by the finding, whose modifier is
#: the site: one line, "Cardiomegaly: 91.00 %".
FINDING_SITE = "363698007: "
CRASH_MARKERS = ("Something went wrong", "Cannot read properties of undefined", "TypeError", "Cannot destructure")
#: The shape whose source image and burned-in SC are opened too.
WITH_IMAGE = ("cr-none-many",)


@pytest.fixture(scope="module")
def opened(tmp_path_factory: pytest.TempPathFactory, output_dir: Path) -> list[tuple[BuiltShape, str, np.ndarray, dict]]:
    """Every shape into one Orthanc, every series opened in one browser: (shape, series, viewport, report)."""
    if shutil.which("node") is None:
        pytest.fail("node is not installed (Debian nodejs): the OHIF test drives chromium from a node script")
    dist = install_viewer()
    shapes = build_shapes(tmp_path_factory.mktemp("ohif-shapes"), DEFAULT_PROFILES["full"])
    # Without the GDCM plugin: Orthanc core (DCMTK) decodes the SEG's JPEG-LS frames for OHIF's per-frame
    # requests (the Debian GDCM plugin segfaulted decoding them in parallel, seen in CI).
    pacs = Orthanc(workdir=tmp_path_factory.mktemp("ohif-orthanc"), plugins=(DICOMWEB_PLUGIN,)).start()
    server = OhifServer(dist, pacs.http_port).start()
    try:
        jobs, keys = [], []
        for built in shapes:
            for path in [built.source_path, *built.paths.values()]:
                assert pacs.upload(path)["Status"] in ("Success", "AlreadyStored"), path
            series = ["sr", "seg", "text_sr"] + (["image", "sc"] if built.shape.name in WITH_IMAGE else [])
            for kind in series:
                if kind != "image" and kind not in built.paths:
                    continue
                uid = str(built.source.SeriesInstanceUID) if kind == "image" else str(built.dataset(kind).SeriesInstanceUID)
                url = f"{server.url}/viewer?StudyInstanceUIDs={built.source.StudyInstanceUID}&initialSeriesInstanceUID={uid}"
                png = output_dir / f"ohif-{built.shape.name}-{kind}.png"
                # A SEG whose pixel data needs a pad byte is fetched frame by frame (OHIF rejects the padded
                # whole instance): give it longer.
                jobs.append({"url": url, "png": str(png), "settle": 10000 if kind == "seg" else 6000})
                keys.append((built, kind))
        jobs_path, report_path = output_dir / "ohif-jobs.json", output_dir / "ohif-report.json"
        jobs_path.write_text(json.dumps(jobs))
        env = {**os.environ, "PLAYWRIGHT_CORE_DIR": str(CACHE / "node_modules" / "playwright-core")}
        done = subprocess.run(["node", str(SCRIPT), str(jobs_path), str(report_path)], capture_output=True, text=True, timeout=900, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert pacs.process is not None and pacs.process.poll() is None, f"Orthanc died (exit {pacs.process.returncode}) while OHIF loaded"
        reports = json.loads(report_path.read_text())
    finally:
        server.stop()
        pacs.stop()
    # The viewport only (right of the study browser, below the toolbar): thumbnails are not the overlay.
    return [
        (built, kind, np.asarray(Image.open(job["png"]).convert("RGB"))[60:990, 300:1350], report) for (built, kind), job, report in zip(keys, jobs, reports)
    ]


def crash_lines(report: dict) -> list[str]:
    lines = [*report["pageErrors"], *(line for line in report["console"] if any(m in line for m in CRASH_MARKERS))]
    if report["gotoError"]:
        lines.append(report["gotoError"])
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


def measurement_groups(built: BuiltShape) -> list:
    sr = built.dataset("sr")
    [measurements] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    return list(measurements.ContentSequence)


def group_has(group, code_value: str) -> bool:
    return any(i.ConceptNameCodeSequence[0].CodeValue == code_value for i in group.ContentSequence)


def test_every_result_series_of_every_shape_opens_without_an_error(opened) -> None:
    failures = {f"{built.shape.name}/{kind}": crash_lines(report) for built, kind, _, report in opened if crash_lines(report)}
    assert not failures, failures
    opened_kinds = {(built.shape.name, kind) for built, kind, _, _ in opened}
    assert len({name for name, _ in opened_kinds}) == 5 and len(opened_kinds) == 15, sorted(opened_kinds)


def test_the_sr_labels_each_box_with_its_finding_and_a_normal_study_says_so(opened) -> None:
    for built, kind, viewport, report in opened:
        if kind != "sr":
            continue
        name, groups = built.shape.name, measurement_groups(built)
        labels = report["svgTexts"]
        # One label line per group: the finding's name and probability, never the code of a finding site.
        expected = sorted(group_label(g) for g in groups)
        assert sorted(labels) == expected, (name, labels, expected)
        assert not any(FINDING_SITE in t for t in labels) or built.shape.findings == "ungrounded", (name, labels)
        assert coloured_pixels(viewport).mean() > 0.0005, f"{name}: no SR box drawn"
        assert len(groups) < 36, f"{name}: the anatomy buries the findings"
        assert not clipped_labels(report), (name, clipped_labels(report))
        # OHIF puts each label right of its box at mid-height; an SR cannot move it. In the many-findings
        # shape two boxes (Atelectasis, Consolidation, right lower zone) share their right edge and
        # mid-height within a few pixels, so their labels meet: the one overlap no SR can avoid.
        assert len(overlapping_labels(report)) <= (1 if built.shape.findings == "many" else 0), (name, overlapping_labels(report))
        if built.shape.findings == "0":
            # A normal study: one group over the lung fields, the classifier's "No finding" probability.
            assert labels == ["No finding: 93.00 %"], (name, labels)
            assert "Findings SR: none" in report["bodyText"], (name, report["bodyText"][:1500])
        else:
            assert len(groups) >= 1 + (built.shape.findings == "many") * 5, name
            assert not any(t.startswith("Probability") for t in labels), (name, labels)


def group_label(group) -> str:
    """What OHIF 3.13 writes beside a group's box (one line per NUM, then a group-level Finding Site)."""
    lines = []
    for item in group.ContentSequence:
        if item.ValueType == "NUM":
            value = item.MeasuredValueSequence[0]
            lines.append(f"{item.ConceptNameCodeSequence[0].CodeMeaning}: {float(value.NumericValue):.2f} {value.MeasurementUnitsCodeSequence[0].CodeValue}")
    lines += [f"{FINDING_SITE}{i.ConceptCodeSequence[0].CodeMeaning}" for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "363698007"][
        :1
    ]
    assert len(lines) == 1, lines  # one short label per box
    return lines[0]


def clipped_labels(report: dict) -> list[str]:
    """Labels that reach past the viewport's canvas (OHIF clips them there)."""
    canvas = report["boxes"]["canvas"]
    if canvas is None:
        return ["no viewport canvas"]
    return [
        label["text"]
        for label in report["boxes"]["labels"]
        if label["x"] < canvas["x"] - 1
        or label["y"] < canvas["y"] - 1
        or label["x"] + label["w"] > canvas["x"] + canvas["w"] + 1
        or label["y"] + label["h"] > canvas["y"] + canvas["h"] + 1
    ]


def overlapping_labels(report: dict) -> list[tuple[str, str]]:
    """Pairs of labels whose boxes intersect (OHIF places each label right of its box, at mid-height)."""
    labels = report["boxes"]["labels"]
    pairs = []
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            if a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]:
                pairs.append((a["text"], b["text"]))
    return pairs


def test_the_seg_shows_the_findings_in_distinct_colours(opened) -> None:
    seen = 0
    for built, kind, viewport, _ in opened:
        if kind != "seg":
            continue
        seen += 1
        segments = len(built.dataset("seg").SegmentSequence)
        labels = [str(s.SegmentLabel) for s in built.dataset("seg").SegmentSequence]
        assert all(not label.startswith("region") and "0." not in label for label in labels), labels  # named for what they are
        mask = coloured_pixels(viewport)
        assert mask.mean() > 0.001, f"{built.shape.name}: no SEG segment drawn"
        assert hue_clusters(viewport, mask) >= min(segments, 4), f"{built.shape.name}: SEG segments are not in distinct colours"
        boxes = sum(len(f.boxes) for f in built.result.findings)  # the findings only, no anatomy
        # Every finding box its own segment, or (many findings) the least probable together in the last.
        assert segments == boxes or (segments < boxes and labels[-1] == f"Other findings ({boxes - segments + 1})"), (labels, boxes)
    assert seen == 3  # the shapes with a located finding


def test_the_text_report_lists_one_item_per_line(opened) -> None:
    for built, kind, _, report in opened:
        if kind != "text_sr":
            continue
        lines = report["bodyText"].splitlines()
        probability_lines = [line for line in lines if ": probability " in line]
        assert len(probability_lines) == len(built.result.image_labels), (built.shape.name, probability_lines)
        sentence_lines = [line for line in lines if line.rstrip().endswith("is healthy.")]
        assert len(sentence_lines) == 36, (built.shape.name, len(sentence_lines))
        assert "DEMO WEIGHTS" in report["bodyText"] and "Impression" in report["bodyText"]


def test_image_and_burned_in_sc_are_shown(opened) -> None:
    shown = 0
    for built, kind, viewport, _ in opened:
        if kind == "image":
            shown += 1
            assert viewport[100:-100, 100:-100].astype(int).std() > 20, f"{built.shape.name}: blank viewport"
        elif kind == "sc":
            shown += 1
            assert coloured_pixels(viewport).mean() > 0.001, f"{built.shape.name}: the SC shows no coloured box"
    assert shown == 2 * len(WITH_IMAGE)
