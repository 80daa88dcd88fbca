"""The highdicom internals sr_writer relies on are still there, still shaped as they were, and our
workarounds still run (sr_writer/_highdicom_compat.py). A failure here means highdicom moved:
revisit the workaround named in the test before widening the version pin."""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path

import highdicom as hd
import highdicom.image as hd_image
import numpy as np
import pydicom
import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from sr_writer import _highdicom_compat as compat
from sr_writer import seg as seg_module
from sr_writer.context import make_context
from tests.sr_writer.conftest import UID_ROOT, read_seg
from tests.support.results import dx_source, make_result

REPO = Path(__file__).resolve().parents[2]


def highdicom_requirement() -> SpecifierSet:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    [spec] = [d for d in dependencies if re.match(r"highdicom\b", d)]
    return SpecifierSet(spec.removeprefix("highdicom"))


def test_the_pin_has_an_upper_bound_and_covers_the_version_the_workarounds_were_made_for() -> None:
    requirement = highdicom_requirement()
    assert any(s.operator in ("<", "<=", "==", "~=") for s in requirement), f"highdicom{requirement} has no upper bound"
    assert Version(compat.HIGHDICOM_MADE_FOR) in requirement
    assert Version(hd.__version__) in requirement, f"installed highdicom {hd.__version__} is outside highdicom{requirement}"


def test_the_private_pixel_check_is_still_a_classmethod_of_that_shape() -> None:
    """Workaround 1: BoxSegmentation overrides it."""
    static = inspect.getattr_static(hd.seg.Segmentation, "_check_and_cast_pixel_array")
    assert isinstance(static, classmethod)
    assert list(inspect.signature(hd.seg.Segmentation._check_and_cast_pixel_array).parameters) == [
        "pixel_array", "segment_numbers", "segmentation_type", "dtype",
    ]  # fmt: skip
    assert "self._check_and_cast_pixel_array(" in inspect.getsource(hd.seg.Segmentation.__init__)


def test_segmentation_still_encodes_frames_through_the_module_name() -> None:
    """Workaround 2: highdicom.image looks encode_frame up by its module-global name at call time."""
    source = inspect.getsource(hd_image)
    assert re.search(r"^from highdicom\.frame import .*\bencode_frame\b", source, re.M)
    assert re.search(r"(?<![.\w])encode_frame\(", source)
    assert hd_image.encode_frame is not compat.HIGHDICOM_ENCODE_FRAME  # ours is installed
    assert compat.HIGHDICOM_ENCODE_FRAME.__module__ == "highdicom.frame"


@pytest.fixture(scope="module")
def ctx():
    source = dx_source()
    return make_context(source, make_result(source, n_findings=3), uid_root=UID_ROOT, analysis_version=1)


def spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record each call of highdicom's own pixel check (reached only when our override hands over)."""
    calls: list[str] = []
    original = hd.seg.Segmentation.__dict__["_check_and_cast_pixel_array"].__func__

    def recording(cls, *args, **kwargs):
        calls.append(cls.__name__)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(hd.seg.Segmentation, "_check_and_cast_pixel_array", classmethod(recording))
    return calls


def test_the_override_runs_and_answers_what_highdicom_would(ctx, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy(monkeypatch)
    ours = seg_module.build_seg(ctx)
    assert calls == [], "highdicom's pixel scan ran: the BoxSegmentation override was not used"
    masks = seg_module.box_masks([(a,) for a in ctx.boxed], ctx.rows, ctx.columns)
    numbers = np.arange(1, masks.shape[-1] + 1)
    _, overlap = hd.seg.Segmentation._check_and_cast_pixel_array(masks, numbers, hd.seg.SegmentationTypeValues.FRACTIONAL, np.uint8)
    assert calls == ["Segmentation"]
    assert ours.SegmentsOverlap == overlap.value


def test_the_fast_rle_path_runs_and_reads_back_exactly(ctx, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    used: list[int] = []
    encode = seg_module.rle_encode_frame
    monkeypatch.setattr(seg_module, "SEG_TRANSFER_SYNTAX", pydicom.uid.RLELossless)
    compat.install_frame_encoder(seg_module._use_fast_rle, lambda frame: used.append(1) or encode(frame))
    try:
        ours = seg_module.build_seg(ctx)
    finally:
        compat.install_frame_encoder(seg_module._use_fast_rle, encode)
    assert len(used) == len(ctx.finding_boxes), "the fast RLE encoder did not run for every frame"
    assert ours.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    read = read_seg(_written(ours, tmp_path))
    expected = seg_module.box_masks(seg_module.finding_segments(ctx), ctx.rows, ctx.columns)[0]
    numbers = list(range(1, len(ctx.finding_boxes) + 1))
    decoded = read.get_pixels_by_source_instance([str(ctx.source.SOPInstanceUID)], segment_numbers=numbers)[0]
    assert np.array_equal(decoded > 0, expected.astype(bool))


def _written(dataset: pydicom.Dataset, directory: Path) -> Path:
    path = directory / "seg.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


def test_the_patched_geometry_is_what_highdicoms_typed_helpers_write(ctx) -> None:
    """Workaround 3: our own spacing (never 0\\0) and a plane orientation, in highdicom's typed form."""
    shared = seg_module.build_seg(ctx).SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == seg_module.pixel_spacing_for(ctx.source)
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]


def test_highdicom_still_has_no_basic_text_sr_and_no_device_uid_in_contributing_equipment() -> None:
    """Workarounds 4 and 6: when highdicom gains them, use them instead."""
    assert not [name for name in dir(hd.sr) if "BasicText" in name]
    assert "device_uid" not in inspect.signature(hd.ContributingEquipment).parameters
    assert "modifier" not in " ".join(inspect.signature(hd.seg.SegmentDescription).parameters)  # workaround 7
