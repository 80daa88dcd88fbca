"""The analysis result contract: pure data, JSON round-trip, no heavy imports.

Everything the engine learns about one source image travels in one :class:`AnalysisResult`.
``sr_writer`` builds DICOM objects from it and ``dicom_node`` stores it as JSON, so this module
imports only the standard library (no torch, no pydicom).

Coordinates: every box is ``(x1, y1, x2, y2)`` in *source image pixels* (column, row), with (0, 0)
the top-left corner of the top-left pixel, already mapped back through the letterbox and clipped to
``[0, columns] x [0, rows]``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

SCHEMA_VERSION = 1

#: The 36 anatomical regions; index i is APM query i and ``<obj_i>`` in the prompt.
#: One table in one place (see shared/anatomix-model.md): everything else refers to it by index.
REGION_NAMES: tuple[str, ...] = (
    "Abdominal cavity",
    "Aortic arch structure",
    "Apical zone of left lung",
    "Apical zone of right lung",
    "Cardiac shadow viewed radiologically or Heart",
    "Descending aorta",
    "Hilar Area of the Left Lung",
    "Hilar Area of the Right Lung",
    "Left clavicle",
    "Left hemidiaphragm",
    "Left lower lung zone",
    "Left lung",
    "Left mid lung zone",
    "Left upper lung zone",
    "Mediastinum",
    "Right atrial structure",
    "Right border of heart viewed radiologically",
    "Right clavicle",
    "Right hemidiaphragm",
    "Right lower lung zone",
    "Right lung",
    "Right mid lung zone",
    "Right upper lung zone",
    "Structure of carina",
    "Structure of left margin of heart",
    "Structure of left upper quadrant of abdomen",
    "Structure of right upper quadrant of abdomen",
    "Superior mediastinum",
    "Superior vena cava structure",
    "Trachea and Main Bronchus",
    "Vertebral column",
    "cavoatrial",
    "left cardiophrenic sulcus",
    "Left costodiaphragmatic recess",
    "right cardiophrenic sulcus",
    "Right costodiaphragmatic recess",
)
assert len(REGION_NAMES) == 36

#: The APM's 14 image-level labels, in the order of its ``image_class_embed`` outputs.
CHEXPERT_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)

#: Task names accepted by the engine and recorded in findings and answers.
TASKS: tuple[str, ...] = (
    "report",
    "anatomy_grounding",
    "anatomy_grounding_lm",
    "phrase_grounding",
    "grounded_diagnosis",
    "grounded_captioning",
    "abnormality_detection",
    "vqa",
    "classification",
)


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in source pixels, xyxy, x = column, y = row."""

    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    def is_degenerate(self) -> bool:
        """True when the box has no area (after clipping it may collapse to a line)."""
        return self.width <= 0 or self.height <= 0

    def as_list(self) -> list[float]:
        return [self.x1, self.y1, self.x2, self.y2]


@dataclass(frozen=True)
class Region:
    """One of the 36 anatomical regions as the APM located it."""

    index: int
    name: str
    box: Box | None
    score: float | None = None
    #: The retrieval DB sentence chosen for this region (``"... is healthy."`` etc.).
    retrieved_sentence: str | None = None

    @property
    def id(self) -> str:
        """Stable identifier within a result, used for tracking IDs across objects."""
        return f"region-{self.index:02d}"


@dataclass(frozen=True)
class Finding:
    """A grounded finding written by the model: a label, its text and zero or more boxes."""

    index: int
    label: str
    text: str
    boxes: tuple[Box, ...]
    task: str
    probability: float | None = None
    #: Anatomical region indices the finding refers to, when the task names them.
    region_indices: tuple[int, ...] = ()

    @property
    def id(self) -> str:
        return f"finding-{self.index:02d}"


@dataclass(frozen=True)
class Report:
    """The generated draft report."""

    findings: str
    impression: str
    raw_text: str


@dataclass(frozen=True)
class TaskAnswer:
    """One language-model answer, kept verbatim for audit and research."""

    task: str
    instruction: str
    raw_text: str
    generated_tokens: int = 0


#: APM backends (``inference.backends``), named here so settings can check one without importing torch.
APM_BACKENDS: tuple[str, ...] = ("torch", "onnxruntime", "tensorrt")

#: Manufacturer (0008,0070) of every object the node creates, and the model's manufacturer by default.
#: Defined here because sr_writer and dicom_node may import this module and it imports neither;
#: read it as ``sr_writer.identity.MANUFACTURER``.
NODE_MANUFACTURER = "AnatomiX Node"


@dataclass(frozen=True)
class ModelIdentity:
    """Which model made the result. ``device_uid`` changes whenever the weights change."""

    name: str
    version: str
    weights_digest: str
    device_uid: str
    demo: bool
    backend: str = "torch"
    device: str = "cpu"
    manufacturer: str = NODE_MANUFACTURER


#: Entries of ``AnalysisResult.timings`` that are counts or rates, not seconds: images in the batch,
#: tokens generated, tokens per second of decode, most sequences decoded together.
TIMING_COUNTS: tuple[str, ...] = ("batch_size", "decode_tokens", "decode_tokens_per_s", "decode_rows_max")


@dataclass(frozen=True)
class AnalysisResult:
    """Everything the engine produced for one source image."""

    sop_instance_uid: str
    rows: int
    columns: int
    regions: tuple[Region, ...]
    findings: tuple[Finding, ...]
    report: Report | None
    model: ModelIdentity
    image_labels: dict[str, float] = field(default_factory=dict)
    answers: tuple[TaskAnswer, ...] = ()
    #: Seconds per stage, e.g. ``{"preprocess": 0.05, "apm": 0.4, "prefill": 1.2, "decode": 3.0}``,
    #: and the counts and rates named in :data:`TIMING_COUNTS` (not seconds).
    timings: dict[str, float] = field(default_factory=dict)
    #: Non-fatal problems (malformed model text, dropped boxes...), human readable.
    warnings: tuple[str, ...] = ()
    schema_version: int = SCHEMA_VERSION

    # ---- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnalysisResult:
        version = data.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ValueError(f"AnalysisResult schema_version {version} is not supported (expected {SCHEMA_VERSION})")

        def box(value: dict[str, Any] | None) -> Box | None:
            return None if value is None else Box(**value)

        regions = tuple(
            Region(
                index=r["index"],
                name=r["name"],
                box=box(r.get("box")),
                score=r.get("score"),
                retrieved_sentence=r.get("retrieved_sentence"),
            )
            for r in data["regions"]
        )
        findings = tuple(
            Finding(
                index=f["index"],
                label=f["label"],
                text=f["text"],
                boxes=tuple(Box(**b) for b in f["boxes"]),
                task=f["task"],
                probability=f.get("probability"),
                region_indices=tuple(f.get("region_indices", ())),
            )
            for f in data["findings"]
        )
        report = Report(**data["report"]) if data.get("report") else None
        return cls(
            sop_instance_uid=data["sop_instance_uid"],
            rows=data["rows"],
            columns=data["columns"],
            regions=regions,
            findings=findings,
            report=report,
            model=ModelIdentity(**data["model"]),
            image_labels=dict(data.get("image_labels", {})),
            answers=tuple(TaskAnswer(**a) for a in data.get("answers", ())),
            timings=dict(data.get("timings", {})),
            warnings=tuple(data.get("warnings", ())),
            schema_version=version,
        )

    @classmethod
    def from_json(cls, text: str) -> AnalysisResult:
        return cls.from_dict(json.loads(text))

    def with_text_checks(self) -> AnalysisResult:
        """This result with a warning for each model text that is not usable (see :func:`unusable_text_reason`)."""
        texts = []
        if self.report is not None:
            texts += [("report findings", self.report.findings), ("report impression", self.report.impression)]
        texts += [(f"finding {f.index} text", f.text) for f in self.findings]
        added = [f"{where}: model output not usable ({reason})" for where, text in texts if (reason := unusable_text_reason(text))]
        return replace(self, warnings=self.warnings + tuple(w for w in added if w not in self.warnings)) if added else self


#: Special tokens a tokenizer or prompt format may leave in decoded text: <emb>, <obj_3>, </s>, <|endoftext|>.
SPECIAL_TOKEN = re.compile(r"<\|?/?[A-Za-z_][A-Za-z0-9_|.-]{0,40}\|?>")


def unusable_text_reason(text: str) -> str | None:
    """Why a model text is degenerate (empty, replacement characters, a repetition loop), else None."""
    visible = SPECIAL_TOKEN.sub(" ", text or "")
    words = visible.split()
    if not "".join(words).replace("\ufffd", ""):
        return "empty" if "\ufffd" not in visible else "replacement characters"
    bad = visible.count("\ufffd")
    if bad >= 3 or bad > 0.02 * len("".join(words)):
        return "replacement characters"
    return "repetition loop" if has_repetition_loop(visible) else None


#: A run of 8 copies of up to 24 characters with no blank between them ("abababab...", "!!!!!!!!").
_REPEATED_CHARACTERS = re.compile(r"(\S{1,24}?)\1{7,}")


def has_repetition_loop(text: str) -> bool:
    """Whether the text repeats itself: a run of 8 copies of up to 24 non-blank characters, one word
    6 times in a row, or a phrase of 2-12 words 4 times in a row (special tokens count as blanks).

    The rule of :func:`unusable_text_reason`; the engine also stops decoding a sequence by it, every
    few tokens, so it is written to be quick (about a millisecond for 350 tokens of text)."""
    words = SPECIAL_TOKEN.sub(" ", text or "").split()
    # a run of non-blank characters lies inside one word: only words of 8+ characters can hold one
    if any(_REPEATED_CHARACTERS.search(word) for word in words if len(word) >= 8):
        return True
    for n in range(1, 13):
        # "no no no no no no" (6 times), or a phrase 4 times in a row: the words match the words n
        # places further on for (times - 1) * n positions in a row
        needed = (5 if n == 1 else 3) * n
        run = 0
        for word, later in zip(words, words[n:]):
            run = run + 1 if word == later else 0
            if run >= needed:
                return True
    return False
