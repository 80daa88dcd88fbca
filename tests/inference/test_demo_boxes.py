"""Demo weights put each anatomy box near its region's typical place on a PA chest radiograph.

The checkpoint goes through the real loader (strict keys) and the real preprocessing; the images are
the real chest CR RG1 as it arrives in several encodings (lossless, lossy JPEG 2000, near-lossless
JPEG-LS), a narrow crop of it and a synthetic chest. The typical boxes are in the 1024 letterboxed
frame, image left = patient right (as radiographs are displayed).
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image, ImageDraw

from inference.apm import APMConfig
from inference.apm.checkpoint import load_apm
from inference.demo_apm import DEMO_REGION_BOXES, synthetic_chest_radiograph, write_demo_apm_checkpoint
from inference.preprocess import PreparedImage, display_values_from_dataset, images_to_tensor, prepare_array, prepare_dataset
from inference.result import REGION_NAMES
from tests.support.corpus import rg1_corpus  # noqa: F401 (fixture)

#: A region's demo box centre lies within this distance (fraction of the 1024 frame) of its typical
#: centre, on any image. Measured: at most ~0.05 on these images.
CENTRE_TOLERANCE = 0.08
#: Width and height within this of the typical box's.
SIZE_TOLERANCE = 0.1

TYPICAL = np.array(DEMO_REGION_BOXES)
TYPICAL_CENTRES = np.stack([(TYPICAL[:, 0] + TYPICAL[:, 2]) / 2, (TYPICAL[:, 1] + TYPICAL[:, 3]) / 2], axis=1)
TYPICAL_SIZES = TYPICAL[:, 2:] - TYPICAL[:, :2]


def side(name: str) -> str | None:
    lowered = name.lower()
    if lowered.startswith("right") or " right " in f" {lowered} " or "of right" in lowered:
        return "right"
    if lowered.startswith("left") or " left " in f" {lowered} " or "of left" in lowered:
        return "left"
    return None


def test_every_lateral_region_name_is_classified() -> None:
    sides = [side(name) for name in REGION_NAMES]
    assert sides.count("right") == 13 and sides.count("left") == 12, list(zip(REGION_NAMES, sides))
    # The typical table itself puts right regions on the image's left half and left regions on its right.
    for name, s, (cx, _) in zip(REGION_NAMES, sides, TYPICAL_CENTRES):
        if s is not None:
            assert (cx < 0.5) == (s == "right"), name


@pytest.fixture(scope="module")
def demo_apm(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo-apm") / "apm.pth"
    write_demo_apm_checkpoint(path, APMConfig.tiny(), seed=0)
    module, report = load_apm(path)
    assert report.missing == () and report.unexpected == ()
    return module


@pytest.fixture(scope="module")
def chest_images(rg1_corpus) -> dict[str, PreparedImage]:
    images = {name: prepare_dataset(pydicom.dcmread(rg1_corpus[name].path)) for name in ("explicit_le", "j2k_lossy", "jpeg_ls_near_lossless")}
    rg1 = display_values_from_dataset(pydicom.dcmread(rg1_corpus["explicit_le"].path))
    images["rg1_narrow_crop"] = prepare_array(rg1[100:1900:3, 300:1500:4])  # 600 x 300 px, other aspect
    images["synthetic_chest"] = prepare_array(synthetic_chest_radiograph(1400, 1100, seed=9))
    return images


def predicted_boxes(module, image: PreparedImage) -> np.ndarray:
    with torch.no_grad():
        return module(images_to_tensor([image]))["boxes"][0].numpy().astype(np.float64)  # [36, 4] cx, cy, w, h


def test_demo_boxes_sit_where_the_anatomy_usually_is(demo_apm, chest_images, output_dir) -> None:
    for name, image in chest_images.items():
        boxes = predicted_boxes(demo_apm, image)
        centre_error = np.linalg.norm(boxes[:, :2] - TYPICAL_CENTRES, axis=1)
        worst = int(centre_error.argmax())
        assert centre_error.max() < CENTRE_TOLERANCE, f"{name}: {REGION_NAMES[worst]} is {centre_error[worst]:.3f} off"
        size_error = np.abs(boxes[:, 2:] - TYPICAL_SIZES).max(axis=1)
        worst = int(size_error.argmax())
        assert size_error.max() < SIZE_TOLERANCE, f"{name}: {REGION_NAMES[worst]} size is {size_error[worst]:.3f} off"
        for region, cx in zip(REGION_NAMES, boxes[:, 0]):
            if side(region) == "right":
                assert cx < 0.5, f"{name}: {region} drawn on the patient's left (cx {cx:.2f})"
            elif side(region) == "left":
                assert cx > 0.5, f"{name}: {region} drawn on the patient's right (cx {cx:.2f})"
        if name == "explicit_le":
            render(image, boxes, output_dir / "demo_boxes_rg1.png")


def test_image_content_only_jitters_the_demo_boxes(demo_apm, chest_images) -> None:
    """Different images give different outputs (the image still reaches the model), but the boxes of
    one region stay within a small spread across images."""
    outputs = [predicted_boxes(demo_apm, image) for image in chest_images.values()]
    spread = np.ptp(np.stack(outputs), axis=0)  # [36, 4]
    assert spread.max() > 0
    assert spread[:, :2].max() < 0.05


def render(image: PreparedImage, boxes: np.ndarray, path) -> None:
    """The letterboxed 1024 input with each demo box and its region index (colour by side)."""
    canvas = Image.fromarray(image.pixels).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    colours = {"right": (255, 80, 80), "left": (80, 160, 255), None: (255, 220, 0)}
    for index, (cx, cy, w, h) in enumerate(boxes * 1024):
        colour = colours[side(REGION_NAMES[index])]
        draw.rectangle((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), outline=colour, width=2)
        draw.text((cx - 6, cy - 6), str(index), fill=colour)
    draw.text((8, 8), "DEMO WEIGHTS: red = right regions, blue = left regions, yellow = midline", fill=(255, 255, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
