"""OHIF pointed at the node itself (issue 23 item 4): the node's QIDO-RS/WADO-RS serve a study and its results.

The node (API and console, uvicorn, a real SQLite store) holds a chest CR received into its spool and the
result bundle sr_writer made for it (SR, SEG, text SR, GSPS, SC, KOS under results_dir), as after an
analysis. OHIF 3.13 (the build tests/viewer uses) is served with the node behind one same-origin proxy,
as a site's reverse proxy would do, its only data source being the node's ``/dicomweb``; ``http.ohif_url``
is set, so the console's study page links to OHIF.

In Debian's headless chromium: a viewer logs in to the console, opens the study page and follows its
"Open in OHIF" link; OHIF (with the console session as its credential) shows the study's image and lists
the result series; the findings SR and SEG open with their boxes drawn. A second browser context with no
session opens the study with an API token in OHIF's ``token`` URL parameter, which OHIF sends as a Bearer
token (without either, the node answers 401: tests/dicom_node/test_dicomweb_read.py).
Screenshots: test-output/ohif-node-*.png (the console's study page, the study, the SR, the SEG, OHIF's
study list); the
stages' seconds are in the fixture's ``stages`` (shown when a test fails).
"""

from __future__ import annotations

import io
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from dicom_node.api import auth
from dicom_node.settings import HttpSettings, Settings, StorageSettings
from dicom_node.store import open_store
from dicom_node.web.app import create_app
from tests.sr_writer.shapes import SHAPES
from tests.support.console_browser import CHROMIUM
from tests.support.held_studies import ServedApp, hold_study
from tests.support.net import free_port
from tests.support.ohif_server import OhifServer, install_viewer
from tests.viewer.test_ohif import CRASH_MARKERS, coloured_pixels, group_label, hue_clusters

pytestmark = pytest.mark.timeout(600)

FINDINGS = 3
#: OHIF needs WebGL: software rendering in the headless chromium (as tests/viewer/ohif_check.mjs does).
CHROMIUM_ARGS = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"]
SETTLE_S = 60


def viewport(png: bytes) -> np.ndarray:
    """The viewport only (right of the study browser, below the toolbar), as in tests/viewer/test_ohif.py."""
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))[60:990, 300:1350]


def image_shown(rgb: np.ndarray) -> bool:
    return bool(rgb[100:-100, 100:-100].astype(int).std() > 20)


def settle(page: Any, ready: Any, png: Path) -> dict[str, Any]:
    """Dismiss OHIF's tour and notice until ``ready(page, viewport)`` holds (or SETTLE_S pass); save the screenshot."""
    started = time.monotonic()
    while True:
        page.wait_for_timeout(1000)
        covered = False
        for label in ("Skip all", "Confirm and hide"):
            button = page.get_by_text(label, exact=True)
            if button.count():
                covered = True
                try:
                    button.first.click(timeout=1000)
                except Exception:  # the tour's overlay may still cover it: the next round tries again
                    pass
        if (not covered and ready(page, viewport(page.screenshot()))) or time.monotonic() > started + SETTLE_S:
            break
    page.wait_for_timeout(500)
    png.write_bytes(page.screenshot())
    return {"seconds": time.monotonic() - started, "body": page.evaluate("document.body.innerText"), "svg": svg_texts(page),
            "viewport": viewport(png.read_bytes())}  # fmt: skip


def svg_texts(page: Any) -> list[str]:
    """The overlay's label texts (OHIF draws SR labels as SVG text)."""
    return page.evaluate("[...document.querySelectorAll('svg text')].map(t => t.textContent)")


def sr_labels(sr: Any) -> list[str]:
    """What OHIF writes beside each box of the findings SR (tests/viewer/test_ohif.py's rule), sorted."""
    [measurements] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    return sorted(group_label(g) for g in measurements.ContentSequence)


def sr_ready(page: Any, rgb: np.ndarray) -> bool:
    return len(svg_texts(page)) >= FINDINGS


def seg_ready(page: Any, rgb: np.ndarray) -> bool:
    return hue_clusters(rgb, coloured_pixels(rgb)) >= 3


@pytest.fixture(scope="module")
def opened(tmp_path_factory: pytest.TempPathFactory, output_dir: Path) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    dist = install_viewer()
    root = tmp_path_factory.mktemp("ohif-on-node")
    node_port = free_port()
    proxy = OhifServer(dist, node_port, prefixes=("/dicomweb/", "/api/", "/console/"), root="/dicomweb", name="anatomix")
    settings = replace(Settings(), storage=replace(StorageSettings(), data_dir=root / "data"), http=replace(HttpSettings(), ohif_url=proxy.url))
    store = open_store(f"sqlite:///{root / 'state.db'}")
    password, token = auth.generate_password(), auth.new_secret(auth.TOKEN_PREFIX)
    store.add_api_user(auth.new_user("reader", "viewer", password))
    store.add_api_token("reader", "ohif", auth.secret_hash(token), store.get_api_user("reader").created_at)
    source = SHAPES[0].source(31)  # RG1 with calibrated pixel spacing (its own 0\0 gives OHIF no geometry)
    held = hold_study(store, settings, [source], n_findings=FINDINGS)
    study = held.study_instance_uid
    out: dict[str, Any] = {"held": held, "proxy": proxy, "stages": []}
    t0 = time.monotonic()
    mark = lambda name: out["stages"].append((name, round(time.monotonic() - t0, 1)))  # noqa: E731
    try:
        with ServedApp(create_app(settings, store), node_port), sync_playwright() as playwright:
            proxy.start()
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            errors: list[str] = []
            session = browser.new_context(viewport={"width": 1400, "height": 1000})
            session.on("page", lambda p: p.on("pageerror", lambda e: errors.append(str(e))))
            mark("browser")
            assert session.request.post(f"{proxy.url}/api/auth/login", data={"username": "reader", "password": password}).ok
            console = session.new_page()
            console.goto(f"{proxy.url}/console/studies/{study}")
            link = console.locator("a[data-ohif]")
            out["link"] = link.get_attribute("href")
            console.screenshot(path=str(output_dir / "ohif-node-console-study.png"), full_page=True)
            mark("console")
            with session.expect_page() as opening:
                link.click()
            viewer = opening.value
            out["study"] = settle(viewer, lambda page, rgb: image_shown(rgb) and "Findings SEG" in page.evaluate("document.body.innerText"),
                                  output_dir / "ohif-node-study.png")  # fmt: skip
            mark("study")
            # The result series from the study browser, in the same viewer (as a radiologist would: double-click).
            for kind, title, ready in (("sr", "Findings SR", sr_ready), ("seg", "Findings SEG", seg_ready)):
                viewer.get_by_text(title).first.dblclick()
                out[kind] = settle(viewer, ready, output_dir / f"ohif-node-{kind}.png")
                mark(kind)
            # OHIF's study list (its start page): a QIDO-RS search of the node's studies.
            worklist = session.new_page()
            worklist.goto(f"{proxy.url}/")
            out["list"] = settle(worklist, lambda page, rgb: "SHAPE31" in page.evaluate("document.body.innerText"), output_dir / "ohif-node-study-list.png")
            mark("list")
            # An API token in OHIF's URL instead of a session: a context without cookies.
            before = len(proxy.proxied)
            with_token = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            with_token.goto(f"{proxy.url}/viewer?StudyInstanceUIDs={study}&token={token}")
            for _ in range(60):
                if any(path.endswith("/metadata") for _, path, _, _, _ in proxy.proxied[before:]):
                    break
                with_token.wait_for_timeout(500)
            out["token_requests"] = proxy.proxied[before:]
            out["token_url"] = with_token.url
            mark("token")
            out["errors"] = errors
            browser.close()
    finally:
        proxy.stop()
        store.close()
    return out


def test_the_console_links_the_study_to_ohif(opened) -> None:
    assert opened["link"] == f"{opened['proxy'].url}/viewer?StudyInstanceUIDs={opened['held'].study_instance_uid}"


def test_ohif_opens_the_study_from_the_node_with_its_result_series(opened) -> None:
    study = opened["study"]
    assert image_shown(study["viewport"]), "the CR is not shown"
    for title in ("Findings SR", "Findings SEG", "Report text SR", "Overlay image SC"):
        assert title in study["body"], (title, study["body"][:1500])
    assert not [line for line in opened["errors"] if any(m in line for m in CRASH_MARKERS)], opened["errors"]
    assert "Something went wrong" not in study["body"]
    paths = [path for _, path, status, _, _ in opened["proxy"].proxied if status == 200]
    assert any("/metadata" in p for p in paths) and any("/frames/1" in p for p in paths) and any(p.startswith("/dicomweb/studies?") for p in paths)


def test_ohifs_study_list_is_a_search_of_the_node(opened) -> None:
    body = opened["list"]["body"]
    # The study the node holds: its patient, accession, modalities (the CR and the results') and instance count.
    assert "Shape, cr-pixel-0" in body and "SHAPE31" in body and "CR\\KO\\OT" in body and "1-1 of 1" in body, body[:1500]


def test_the_findings_sr_draws_a_labelled_box_per_finding(opened) -> None:
    sr = opened["sr"]
    expected = sr_labels(opened["held"].results["sr"])
    assert sorted(sr["svg"]) == expected and len(expected) >= FINDINGS, (sr["svg"], expected)
    assert coloured_pixels(sr["viewport"]).mean() > 0.0005, "no SR box drawn"


def test_the_findings_seg_shows_the_findings_in_distinct_colours(opened) -> None:
    seg = opened["seg"]
    mask = coloured_pixels(seg["viewport"])
    assert mask.mean() > 0.001 and hue_clusters(seg["viewport"], mask) >= 3, "SEG segments not drawn in distinct colours"


def test_an_api_token_in_ohifs_url_is_its_credential(opened) -> None:
    dicomweb = [(path, status) for _, path, status, _, _ in opened["token_requests"] if path.startswith("/dicomweb/")]
    assert any(path.endswith("/metadata") and status == 200 for path, status in dicomweb), dicomweb
    assert all(status == 200 for _, status in dicomweb), dicomweb
    assert "token=" not in opened["token_url"]  # OHIF takes it out of the address bar
