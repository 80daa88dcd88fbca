"""Task instructions as the model was trained to read them."""

from __future__ import annotations

import pytest

from inference.result import TASKS
from inference.tasks import (
    ANSWER_KINDS,
    TaskError,
    TaskRequest,
    classification_instruction,
    instruction_for,
)


def test_every_task_is_known_and_lm_tasks_have_an_answer_kind() -> None:
    assert set(ANSWER_KINDS) == set(TASKS) - {"anatomy_grounding"}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("report", "Generate findings and impressions:\n"),
        ("anatomy_grounding_lm:right lung", "Where is the Right lung located in this Chest X-ray?"),
        ("anatomy_grounding_lm:4", "Where is the Cardiac shadow viewed radiologically or Heart located in this Chest X-ray?"),
        ("phrase_grounding:left pleural effusion", "Please locate the following phrase: left pleural effusion"),
        (
            "grounded_diagnosis:50,60,70,80;10,20,30,40",
            "Please give the corresponding diagnosis for the following region(s): <box>(10,20),(30,40)</box><box>(50,60),(70,80)</box>",
        ),
        ("grounded_captioning:1,2,3,4", "Please generate a caption for the following region(s): <box>(1,2),(3,4)</box>"),
        ("abnormality_detection", "Detect abnormalities in the given image."),
        ("vqa:Is there a pneumothorax? [yes/no]", "Is there a pneumothorax? Options:\n(A) yes\n(B) no"),
        ("vqa:Where is the tube?", "Where is the tube?"),
    ],
)
def test_instructions(spec: str, expected: str) -> None:
    assert instruction_for(TaskRequest.parse(spec), image_labels={}) == expected


def test_classification_lists_the_chexpert_labels_as_options() -> None:
    text = classification_instruction()
    assert text.startswith("Given the CXR, identify any diseases. Options:\n(A) Atelectasis\n(B) Cardiomegaly")
    assert text.endswith("(N) Support Devices")


def test_defaults_use_the_image_labels_and_earlier_boxes() -> None:
    labels = {"Pleural Effusion": 0.9, "No Finding": 0.95, "Edema": 0.2}
    assert instruction_for(TaskRequest("phrase_grounding"), labels) == "Please locate the following phrase: pleural effusion"
    assert instruction_for(TaskRequest("phrase_grounding"), {"Edema": 0.1}) is None
    assert instruction_for(TaskRequest("grounded_diagnosis"), {}) is None
    assert instruction_for(TaskRequest("grounded_diagnosis"), {}, [(5, 6, 7, 8)]).endswith("<box>(5,6),(7,8)</box>")
    assert instruction_for(TaskRequest("vqa"), {}) is None


@pytest.mark.parametrize(("spec", "message"), [("segment", "unknown task"), ("anatomy_grounding_lm:spleen", "unknown region")])
def test_bad_specs_are_refused_with_the_reason(spec: str, message: str) -> None:
    with pytest.raises(TaskError, match=message):
        TaskRequest.parse(spec)


def test_bad_box_argument_is_refused() -> None:
    with pytest.raises(TaskError, match="4 numbers"):
        instruction_for(TaskRequest.parse("grounded_diagnosis:1,2,3"), {})
