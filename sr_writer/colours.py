"""One colour table for every object: each region and each finding its own colour, the same in SEG,
GSPS and the burned-in SC.

Regions (36): hues spread by the golden angle so neighbouring indices (and left/right pairs, which
sit next to each other in the region list) differ; muted (medium saturation), because anatomy is
context. Findings: fully saturated warm and magenta hues a radiologist's eye goes to first, cycled by
finding index; every box of one finding shares its colour. Colours are plain sRGB; DICOM objects carry
them as CIELab (``highdicom.color.CIELabColor.from_rgb``).
"""

from __future__ import annotations

import colorsys
import re

from inference.result import REGION_NAMES

RGB = tuple[int, int, int]

_GOLDEN = 0.6180339887498949


def _region_colour(index: int) -> RGB:
    hue = (0.33 + index * _GOLDEN) % 1.0
    saturation = (0.45, 0.6, 0.35)[index % 3]
    value = (0.95, 0.80, 1.0)[(index // 3) % 3]
    red, green, blue = colorsys.hsv_to_rgb(hue, saturation, value)
    return (round(red * 255), round(green * 255), round(blue * 255))


#: Region index -> colour.
REGION_COLOURS: dict[int, RGB] = {index: _region_colour(index) for index in range(len(REGION_NAMES))}

#: Finding colours, by finding index modulo the table: saturated, bright, unlike the muted anatomy.
FINDING_COLOURS: tuple[RGB, ...] = (
    (255, 40, 40),  # red
    (255, 150, 0),  # orange
    (255, 0, 200),  # magenta
    (255, 235, 0),  # yellow
    (0, 200, 255),  # cyan
    (255, 90, 140),  # pink
    (170, 80, 255),  # violet
    (200, 255, 0),  # lime
    (255, 120, 80),  # coral
    (0, 255, 160),  # spring green
)

#: Findings the model did not localise (one text line each, no box), in the GSPS whole-image layer and
#: the SC legend: a red like the findings', but its own value, since every GSPS layer needs its own colour.
WHOLE_IMAGE_FINDINGS_RGB: RGB = (255, 64, 64)
#: The GSPS layer of the regions no finding is grounded to (switchable context): muted grey-green.
ANATOMY_RGB: RGB = (150, 170, 150)
#: The findings SEG's last segment when the least probable boxes share one (``sr_writer.seg.finding_segments``):
#: light grey, "the rest", unlike every finding colour.
OTHER_FINDINGS_RGB: RGB = (225, 225, 225)
#: The burned-in SC only: banner text, and the outline around label text.
BANNER_TEXT_RGB: RGB = (255, 220, 0)
OUTLINE_RGB: RGB = (0, 0, 0)

_KEY = re.compile(r"^(region|finding)-(\d+)")


def colour_for_key(key: str) -> RGB:
    """The colour of an annotation key ("region-03", "finding-02", "finding-02-box1")."""
    match = _KEY.match(key)
    if match is None:
        raise ValueError(f"annotation key {key!r} names neither a region nor a finding")
    kind, number = match.group(1), int(match.group(2))
    if kind == "region":
        return REGION_COLOURS[number]
    return FINDING_COLOURS[number % len(FINDING_COLOURS)]
