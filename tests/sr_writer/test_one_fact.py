"""Facts defined once: SOP Class UIDs, our Manufacturer, the demo banner, the Device observer and the
colours each live in one place, and every object of a bundle agrees with it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from dicom_node.pipeline.selection import OUR_MANUFACTURER, is_own_output
from inference.result import NODE_MANUFACTURER, ModelIdentity
from sr_writer.colours import WHOLE_IMAGE_FINDINGS_RGB, colour_for_key
from sr_writer.context import make_context
from sr_writer.identity import DEMO_MARK, MANUFACTURER
from sr_writer.overlay import layout
from sr_writer.sc import banner_text, footer_lines
from tests.sr_writer.conftest import UID_ROOT

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("sr_writer", "dicom_node", "inference")
#: Storage SOP classes live under 1.2.840.10008.5.1.4 (PS3.6 Annex A).
_SOP_CLASS = re.compile(r"^1\.2\.840\.10008\.5\.1\.4\.[\d.]+$")


def string_constants(package: str):
    for path in sorted((REPO / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
        }  # fmt: skip
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                yield f"{path.relative_to(REPO)}:{node.lineno}", node.value


def test_sop_class_uids_come_from_pydicom() -> None:
    literals = [where for package in PACKAGES for where, text in string_constants(package) if _SOP_CLASS.match(text)]
    assert not literals, f"SOP Class UID literals at {literals}: use the pydicom.uid constants"


def test_the_demo_banner_and_the_manufacturer_are_written_once() -> None:
    banner = [where for package in PACKAGES for where, text in string_constants(package) if "NOT FOR CLINICAL" in text]
    assert len(banner) == 1 and banner[0].startswith("sr_writer/identity.py"), banner
    manufacturer = [where for package in PACKAGES for where, text in string_constants(package) if text == NODE_MANUFACTURER]
    assert len(manufacturer) == 1 and manufacturer[0].startswith("inference/result.py"), manufacturer
    assert OUR_MANUFACTURER is MANUFACTURER is NODE_MANUFACTURER
    assert ModelIdentity("m", "1", "d", "1.2.3", False).manufacturer == MANUFACTURER


def test_selection_recognises_every_object_of_a_bundle_as_ours(case) -> None:
    for built in case.bundle.objects:
        assert built.dataset.Manufacturer == MANUFACTURER
        # Even under another UID root, the Manufacturer alone says it is ours.
        assert is_own_output(built.dataset, "9.9.9.") == f"produced by this node (Manufacturer {MANUFACTURER!r})", built.kind
        assert built.dataset.ContributingEquipmentSequence[0].Manufacturer == MANUFACTURER
        if case.result.model.demo:
            assert DEMO_MARK in built.dataset.SeriesDescription, built.kind


def test_every_sr_and_kos_names_the_same_device_observer(case) -> None:
    calls = [where for package in ("sr_writer",) for path in sorted((REPO / package).rglob("*.py"))
             for where in [f"{path.relative_to(REPO)}"] if "DeviceObserverIdentifyingAttributes(" in path.read_text()]  # fmt: skip
    assert calls == ["sr_writer/equipment.py"], calls
    observers = {}
    for built in case.bundle.objects:
        if built.kind in ("sr", "text_sr", "kos"):
            items = list(_walk(built.dataset))
            device = [
                i for i in items if i.get("ConceptNameCodeSequence") and i.ConceptNameCodeSequence[0].CodeValue in ("121012", "121013", "121014", "121015")
            ]
            observers[built.kind] = sorted((i.ConceptNameCodeSequence[0].CodeValue, str(i.get("UID", i.get("TextValue", "")))) for i in device)
    assert len(observers) == 3 and observers["sr"] and observers["sr"] == observers["text_sr"] == observers["kos"], observers
    assert ("121012", case.result.model.device_uid) in observers["sr"]


def _walk(dataset):
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _walk(item)


def _lab(rgb: tuple[int, int, int]) -> list[int]:
    import highdicom as hd

    return list(hd.color.CIELabColor.from_rgb(*rgb).value)


def test_gsps_seg_and_sc_take_their_colours_from_the_one_table(case) -> None:
    seg, gsps = case.dataset("seg"), case.dataset("gsps")
    segment_colour = {s.TrackingID.split()[0]: list(s.RecommendedDisplayCIELabValue) for s in seg.SegmentSequence}
    layer_colour = {layer.GraphicLayer: list(layer.GraphicLayerRecommendedDisplayCIELabValue) for layer in gsps.GraphicLayerSequence}
    assert layer_colour["FINDING_00"] == segment_colour["finding-00"] == _lab(colour_for_key("finding-00"))
    # Findings without a box: the GSPS whole-image layer and the SC legend lines share one colour.
    assert case.result.findings[0].boxes and any(not f.boxes for f in case.result.findings)
    assert layer_colour["WHOLE_IMAGE"] == _lab(WHOLE_IMAGE_FINDINGS_RGB)
    ctx = make_context(case.source, case.result, uid_root=UID_ROOT, analysis_version=1)
    geometry = layout(ctx.annotations, ctx.rows, ctx.columns, banner_text(ctx), footer_lines(ctx))
    assert footer_lines(ctx) and geometry.legend_colours[-len(footer_lines(ctx)) :] == (WHOLE_IMAGE_FINDINGS_RGB,) * len(footer_lines(ctx))


def test_colour_literals_live_in_the_colour_table() -> None:
    rgb = re.compile(r"\(\s*\d{1,3},\s*\d{1,3},\s*\d{1,3}\s*\)")
    users = [p.name for p in sorted((REPO / "sr_writer").glob("*.py")) if p.name in ("gsps.py", "seg.py", "sc.py", "overlay.py") and rgb.search(p.read_text())]
    assert not users, f"colour literals in {users}: put them in sr_writer/colours.py"
