"""Reading the model's answers: clean-up, boxes with their ``<ref>`` labels, report sections.

Malformed text never raises: what cannot be read is dropped and described in a warning string,
which the engine puts into the result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from inference.preprocess import Letterbox

BOX_PATTERN = re.compile(r"<box>\s*\((.*?)\)\s*</box>", re.DOTALL)
NUMBER_PATTERN = re.compile(r"-?\d+(?:\.\d+)?")
REF_PATTERN = re.compile(r"<ref>(.*?)</ref>", re.DOTALL)
TAG_PATTERN = re.compile(r"</?[a-zA-Z_][\w]*>")
_SECTION = re.compile(r"(findings|impressions?)\s*:", re.IGNORECASE)


def postprocess_answer(text: str) -> str:
    """The reference's clean-up of decoded text: strip, drop exact-duplicate lines (first kept, before
    stripping them), drop empty lines, strip each line, join with newlines."""
    lines = list(dict.fromkeys(text.strip().splitlines()))
    return "\n".join(line.strip() for line in lines if line.strip())


@dataclass(frozen=True)
class ParsedBox:
    """One box read from an answer: its label, as written (model frame) and in source pixels (clipped)."""

    label: str
    box_model: tuple[float, float, float, float]
    box_source: tuple[float, float, float, float]


@dataclass(frozen=True)
class ParsedAnswer:
    boxes: tuple[ParsedBox, ...]
    warnings: tuple[str, ...]


def _label_before(segment: str) -> str:
    """The last ``<ref>..</ref>`` in the text since the previous box, else that text without tags."""
    refs = REF_PATTERN.findall(segment)
    if refs:
        return refs[-1].strip()
    plain = TAG_PATTERN.sub(" ", segment)
    return " ".join(plain.split()).strip(" ,.;:")


def parse_grounded_answer(text: str, letterbox: Letterbox) -> ParsedAnswer:
    """Every ``<box>(x1,y1),(x2,y2)</box>`` with its label, mapped back to source pixels and clipped.

    A box without exactly four numbers, or one that collapses to no area after clipping, is dropped
    with a warning; a box with an empty label inherits the previous box's label (several boxes for
    one ``<ref>``).
    """
    boxes: list[ParsedBox] = []
    warnings: list[str] = []
    previous_end = 0
    previous_label = ""
    for number, match in enumerate(BOX_PATTERN.finditer(text), start=1):
        label = _label_before(text[previous_end : match.start()]) or previous_label
        previous_end = match.end()
        values = [float(v) for v in NUMBER_PATTERN.findall(match.group(1))]
        if len(values) != 4:
            warnings.append(f"box {number} in the model's answer has {len(values)} numbers instead of 4; ignored")
            continue
        x1, y1, x2, y2 = values
        model_box = (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
        source = letterbox.clip(letterbox.to_source(model_box))
        if source[2] <= source[0] or source[3] <= source[1]:
            warnings.append(f"box {number} ({match.group(1).strip()}) lies outside the image; ignored")
            continue
        boxes.append(ParsedBox(label=label, box_model=model_box, box_source=source))
        previous_label = label
    opened = text.count("<box>")
    matched = len(BOX_PATTERN.findall(text))
    if opened > matched:
        warnings.append(f"{opened - matched} <box> tag(s) in the model's answer are not well formed; ignored")
    return ParsedAnswer(boxes=tuple(boxes), warnings=tuple(warnings))


def strip_tags(text: str) -> str:
    """Answer text for people: ``<ref>``/``<box>`` markup removed, box coordinates dropped."""
    without_boxes = BOX_PATTERN.sub(" ", text)
    return " ".join(TAG_PATTERN.sub(" ", without_boxes).split())


def split_report(text: str) -> tuple[str, str]:
    """``(findings, impression)`` from a ``Findings: ... Impression: ...`` answer.

    Without section headers everything is findings; a header that appears twice keeps the first.
    """
    findings: list[str] = []
    impression: list[str] = []
    current = findings
    position = 0
    for match in _SECTION.finditer(text):
        current.append(text[position : match.start()])
        current = impression if match.group(1).lower().startswith("impression") else findings
        position = match.end()
    current.append(text[position:])
    return " ".join("".join(findings).split()), " ".join("".join(impression).split())
