"""Answer parsing: boxes with labels, inverse letterbox, clipping, malformed text, report sections."""

from __future__ import annotations

import pytest

from inference.parsing import parse_grounded_answer, postprocess_answer, split_report, strip_tags
from inference.preprocess import Letterbox
from inference.prompt import format_box


@pytest.mark.parametrize(
    ("rows", "columns"),
    [(900, 700), (2500, 2048), (600, 1000), (2000, 3001), (800, 800), (1024, 1024)],
    ids=["portrait", "portrait-large", "landscape", "landscape-odd", "square", "square-1024"],
)
def test_box_round_trips_within_one_source_pixel(rows: int, columns: int) -> None:
    letterbox = Letterbox.for_shape(rows, columns)
    source = (0.31 * columns, 0.22 * rows, 0.74 * columns, 0.9 * rows)
    model = letterbox.to_model(source)
    # the model writes integer model-frame pixels; one model pixel is 1/scale source pixels
    answer = f"<ref>Pleural effusion</ref><box>{format_box([round(v) for v in model])}</box>"
    parsed = parse_grounded_answer(answer, letterbox)
    assert parsed.warnings == ()
    assert len(parsed.boxes) == 1 and parsed.boxes[0].label == "Pleural effusion"
    tolerance = max(1.0, 0.5 / min(letterbox.scale_x, letterbox.scale_y))
    for got, want in zip(parsed.boxes[0].box_source, source):
        assert abs(got - want) <= tolerance
    if min(letterbox.scale_x, letterbox.scale_y) >= 1.0:  # source no larger than the model frame
        assert all(abs(g - w) <= 1.0 for g, w in zip(parsed.boxes[0].box_source, source))


def test_boxes_are_clipped_to_the_image() -> None:
    letterbox = Letterbox.for_shape(1000, 500)  # pad_x = 250 source pixels on each side
    parsed = parse_grounded_answer("<box>(-10,-10),(2000,512)</box>", letterbox)
    (box,) = parsed.boxes
    assert box.box_source[0] == 0.0 and box.box_source[1] == 0.0 and box.box_source[2] == 500.0
    assert box.box_source[3] == pytest.approx(500.0)


def test_labels_come_from_the_last_ref_since_the_previous_box() -> None:
    letterbox = Letterbox.for_shape(1024, 1024)
    text = "<ref>Cardiomegaly</ref><ref>Effusion</ref><box>(1,2),(30,40)</box><box>(50,60),(70,80)</box> then Nodule in the left lung <box>(5,5),(9,9)</box>"
    parsed = parse_grounded_answer(text, letterbox)
    assert [b.label for b in parsed.boxes] == ["Effusion", "Effusion", "then Nodule in the left lung"]


@pytest.mark.parametrize(
    "text",
    [
        "<box>(1,2),(3)</box>",
        "<box>(1,2),(3,4),(5,6)</box>",
        "<box>(a,b),(c,d)</box>",
        "<box>(1,2),(3,4)",
        "<ref>x</ref><box>",
        "<box>(2000,2000),(3000,3000)</box>",
        "\x00\uffff<box>((((</box>",
    ],
)
def test_malformed_answers_never_raise_and_warn(text: str) -> None:
    parsed = parse_grounded_answer(text, Letterbox.for_shape(512, 512))
    assert parsed.boxes == ()
    assert parsed.warnings


def test_one_bad_box_keeps_the_good_ones() -> None:
    parsed = parse_grounded_answer("<ref>A</ref><box>(1,2),(3)</box><ref>B</ref><box>(10,10),(20,20)</box>", Letterbox.for_shape(1024, 1024))
    assert [b.label for b in parsed.boxes] == ["B"]
    assert len(parsed.warnings) == 1 and "3 numbers" in parsed.warnings[0]


def test_decimal_and_spaced_numbers_are_read() -> None:
    parsed = parse_grounded_answer("<box> ( 1.5, 2 ) , ( 30 , 40.25 ) </box>", Letterbox.for_shape(1024, 1024))
    assert parsed.boxes[0].box_model == (1.5, 2.0, 30.0, 40.25)


def test_postprocess_matches_the_reference_cleanup() -> None:
    raw = "  Findings:\nThe heart is normal.\nThe heart is normal.\n\n  \nImpression:\n No acute process. \n"
    assert postprocess_answer(raw) == "Findings:\nThe heart is normal.\nImpression:\nNo acute process."


def test_report_is_split_into_findings_and_impression() -> None:
    assert split_report("Findings:\nLungs are clear.\nImpression:\nNormal chest.") == ("Lungs are clear.", "Normal chest.")
    assert split_report("Lungs are clear.") == ("Lungs are clear.", "")
    assert split_report("FINDINGS: a\nIMPRESSIONS: b") == ("a", "b")


def test_strip_tags_keeps_the_words() -> None:
    assert strip_tags("The <ref>Right lung</ref> is at <box>(1,2),(3,4)</box>.") == "The Right lung is at ."
