"""Task instructions (the text after ``Task:``) and how each task's answer is read.

Task names are :data:`inference.result.TASKS`. A task may take an argument (a region, a phrase, a
question, boxes); on the command line or in settings it is written ``name`` or ``name:argument``
(for example ``vqa:Is there a pleural effusion?`` or ``anatomy_grounding_lm:Right lung``).
:meth:`TaskRequest.parse` is the one reader of that syntax: the engine and ``dicom_node.settings``
both call it, so a task the settings accept is one the engine runs. This module imports nothing
heavy at import time (the tokenizer-side prompt helpers are imported when an instruction is built).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from inference.result import CHEXPERT_LABELS, REGION_NAMES, TASKS

REPORT_INSTRUCTION = "Generate findings and impressions:\n"
ABNORMALITY_INSTRUCTION = "Detect abnormalities in the given image."
NO_ABNORMALITY_ANSWER = "No abnormalities detected."
#: Default region for ``anatomy_grounding_lm`` without an argument.
DEFAULT_LM_REGION = "Cardiac shadow viewed radiologically or Heart"


@dataclass(frozen=True)
class TaskFlags:
    """What the engine needs to know about one LM task (it tests these, never task names)."""

    #: How the answer is read: ``report`` (sections), ``boxes`` (grounded findings), ``text`` (verbatim).
    answer: str
    #: ``boxes``: the argument names one region (default :data:`DEFAULT_LM_REGION`); every box found
    #: is that region's finding, with the answer's text.
    region_answer: bool = False
    #: ``text``: the answer names the boxes the task asked about (:func:`boxes_for`), and becomes one
    #: finding over them.
    labels_asked_boxes: bool = False
    #: The warning's reason when the task has nothing to ask of an image.
    skipped_because: str = "no argument"


#: The LM tasks and their flags (the other names in ``TASKS`` need no language model).
LM_TASKS: dict[str, TaskFlags] = {
    "report": TaskFlags("report"),
    "anatomy_grounding_lm": TaskFlags("boxes", region_answer=True),
    "phrase_grounding": TaskFlags("boxes", skipped_because="no phrase given and no CheXpert label above 0.5"),
    "abnormality_detection": TaskFlags("boxes"),
    "grounded_diagnosis": TaskFlags("text", labels_asked_boxes=True, skipped_because="no boxes given and no earlier grounded finding"),
    "grounded_captioning": TaskFlags("text", labels_asked_boxes=True, skipped_because="no boxes given and no earlier grounded finding"),
    "vqa": TaskFlags("text", skipped_because="no question given; use vqa:QUESTION"),
    "classification": TaskFlags("text"),
}
#: How an answer is read, per LM task (``LM_TASKS[task].answer``).
ANSWER_KINDS: dict[str, str] = {task: flags.answer for task, flags in LM_TASKS.items()}


class TaskError(ValueError):
    """An unknown task name or an unusable argument."""


@dataclass(frozen=True)
class TaskRequest:
    """One task to run on every image of a call; ``argument`` as documented per task."""

    task: str
    argument: str | None = None

    @classmethod
    def parse(cls, spec: str | TaskRequest) -> TaskRequest:
        """``"name"`` or ``"name:argument"`` -> request; raises :class:`TaskError` for unknown names."""
        if isinstance(spec, TaskRequest):
            request = spec
        else:
            name, _, argument = spec.partition(":")
            request = cls(name.strip(), argument.strip() or None)
        if request.task not in TASKS:
            raise TaskError(f"unknown task {request.task!r}; known tasks: {', '.join(TASKS)}")
        if request.task == "anatomy_grounding_lm" and request.argument:
            region_name(request.argument)  # validate early
        if request.task in ("grounded_diagnosis", "grounded_captioning") and request.argument:
            _parse_box_argument(request.argument)
        return request

    @property
    def uses_lm(self) -> bool:
        return self.task in ANSWER_KINDS


def region_name(argument: str) -> str:
    """A region given by name (case-insensitive) or index 0-35 -> its display name."""
    if argument.isdigit() and int(argument) < len(REGION_NAMES):
        return REGION_NAMES[int(argument)]
    for name in REGION_NAMES:
        if name.lower() == argument.lower():
            return name
    raise TaskError(f"unknown region {argument!r}: use one of the 36 region names or an index 0-35")


def report_instruction() -> str:
    return REPORT_INSTRUCTION


def anatomy_grounding_instruction(region: str) -> str:
    return f"Where is the {region_name(region)} located in this Chest X-ray?"


def phrase_grounding_instruction(phrase: str) -> str:
    return f"Please locate the following phrase: {phrase}"


def grounded_diagnosis_instruction(boxes_xyxy_model: Sequence[Sequence[float]]) -> str:
    from inference.prompt import format_boxes  # transformers: only where an instruction is built

    return f"Please give the corresponding diagnosis for the following region(s): {format_boxes(boxes_xyxy_model)}"


def grounded_captioning_instruction(boxes_xyxy_model: Sequence[Sequence[float]]) -> str:
    from inference.prompt import format_boxes  # transformers: only where an instruction is built

    return f"Please generate a caption for the following region(s): {format_boxes(boxes_xyxy_model)}"


def abnormality_detection_instruction() -> str:
    return ABNORMALITY_INSTRUCTION


def vqa_instruction(question: str, closed: bool = False) -> str:
    """Open question verbatim; closed (yes/no) questions get the training's option block."""
    return f"{question} Options:\n(A) yes\n(B) no" if closed else question


def classification_instruction(labels: Sequence[str] = CHEXPERT_LABELS) -> str:
    options = "\n".join(f"({chr(ord('A') + i)}) {label}" for i, label in enumerate(labels))
    return f"Given the CXR, identify any diseases. Options:\n{options}"


def default_phrase(image_labels: dict[str, float]) -> str | None:
    """Phrase for ``phrase_grounding`` without an argument: the most likely positive CheXpert finding."""
    candidates = {k: v for k, v in image_labels.items() if k not in ("No Finding", "Support Devices")}
    if not candidates:
        return None
    label, probability = max(candidates.items(), key=lambda item: item[1])
    return label.lower() if probability >= 0.5 else None


def boxes_for(request: TaskRequest, finding_boxes_model: Sequence[Sequence[float]] = ()) -> list[tuple[int, ...]]:
    """The model-frame boxes a grounded diagnosis / captioning request asks about (argument first,
    else the boxes earlier grounded tasks found in this image)."""
    if request.argument:
        return list(_parse_box_argument(request.argument))
    return [tuple(int(v) for v in box) for box in finding_boxes_model]


def instruction_for(
    request: TaskRequest,
    image_labels: dict[str, float],
    finding_boxes_model: Sequence[Sequence[float]] = (),
) -> str | None:
    """The instruction for one image, or None when the task has nothing to ask about for it
    (no phrase, no boxes from an earlier grounded task, no question)."""
    task, argument = request.task, request.argument
    if task == "report":
        return report_instruction()
    if task == "anatomy_grounding_lm":
        return anatomy_grounding_instruction(argument or DEFAULT_LM_REGION)
    if task == "phrase_grounding":
        phrase = argument or default_phrase(image_labels)
        return phrase_grounding_instruction(phrase) if phrase else None
    if task in ("grounded_diagnosis", "grounded_captioning"):
        boxes = boxes_for(request, finding_boxes_model)
        if not boxes:
            return None
        builder = grounded_diagnosis_instruction if task == "grounded_diagnosis" else grounded_captioning_instruction
        return builder(boxes)
    if task == "abnormality_detection":
        return abnormality_detection_instruction()
    if task == "vqa":
        if not argument:
            return None
        closed = argument.endswith("[yes/no]")
        return vqa_instruction(argument.removesuffix("[yes/no]").strip(), closed=closed)
    if task == "classification":
        return classification_instruction()
    return None


def _parse_box_argument(argument: str) -> list[tuple[int, int, int, int]]:
    """``x1,y1,x2,y2;x1,y1,x2,y2`` (model-frame pixels) -> boxes."""
    boxes: list[tuple[int, int, int, int]] = []
    for part in argument.split(";"):
        values = [v for v in part.replace("(", " ").replace(")", " ").replace(",", " ").split() if v]
        if len(values) != 4:
            raise TaskError(f"box {part!r} needs 4 numbers x1,y1,x2,y2 (model-frame pixels)")
        try:
            x1, y1, x2, y2 = (int(float(v)) for v in values)
            boxes.append((x1, y1, x2, y2))
        except ValueError:
            raise TaskError(f"box {part!r} needs 4 numbers x1,y1,x2,y2 (model-frame pixels)") from None
    return boxes
