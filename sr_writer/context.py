"""What every builder needs: the checked inputs, the annotations to draw, UIDs and series naming.

:func:`make_context` validates the source/result pair once (raising ValueError naming the bad
argument) and turns regions and findings into :class:`Annotation` objects: boxes clipped to the image,
degenerate boxes dropped with a warning, tracking identifiers and UIDs fixed, codes chosen. Builders
then only format; every object of a bundle agrees on the same boxes and tracking UIDs.

It also checks the two per-image model outputs that are not boxes: the image-level classification
probabilities (:class:`ImageLabel`, sorted by label) and each region's retrieved sentence
(:class:`RegionSentence`, whitespace collapsed; an empty or missing sentence is simply absent).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import pydicom
from pydicom.sr.coding import Code

from inference.result import REGION_NAMES, AnalysisResult, Box
from sr_writer import codes
from sr_writer.identity import DEMO_MARK, MANUFACTURER
from sr_writer.kinds import KINDS, SR_ANATOMY_MODES
from sr_writer.text import character_set_for, clean_model_text, truncate, usable_model_text
from sr_writer.uids import check_uid_root, derive_series_uid, derive_uid, is_valid_uid


@dataclass(frozen=True)
class Annotation:
    """One box (or, for a finding without a box, one whole-image statement) shared by all objects."""

    kind: str  # "region" or "finding"
    key: str  # stable within the result, e.g. "region-03" or "finding-02-box1"
    tracking_id: str  # human readable, LO-safe (<= 64 chars)
    tracking_uid: str
    label: str  # short display text (GSPS, SC, SEG segment label), <= 64 chars
    box: Box | None
    finding_type: Code
    sites: tuple[codes.AnatomicSite, ...]
    probability: float | None = None
    text: str = ""
    #: What it is, without probability ("Cardiomegaly", "Heart"): the SEG segment label.
    name: str = ""

    @property
    def is_region(self) -> bool:
        return self.kind == "region"


@dataclass(frozen=True)
class ImageLabel:
    """One image-level classification output: a whole-image statement with a probability, no box."""

    label: str  # as the model names it, e.g. "Pleural Effusion"
    probability: float
    key: str  # stable within the result, e.g. "image-label-pleural-effusion"
    tracking_id: str  # LO-safe, e.g. "image-label Pleural Effusion"
    tracking_uid: str
    finding_type: Code


@dataclass(frozen=True)
class RegionSentence:
    """The retrieval DB sentence of one region (also for a region the model did not locate)."""

    index: int
    name: str  # display name, e.g. "Heart"
    sentence: str


@dataclass(frozen=True)
class BundleContext:
    source: pydicom.Dataset
    result: AnalysisResult
    uid_root: str
    analysis_version: int
    institution_name: str
    annotations: tuple[Annotation, ...]
    character_set: str | list[str] | None
    warnings: tuple[str, ...] = field(default=())
    #: Image-level classification, sorted by label; empty when the result has none.
    image_labels: tuple[ImageLabel, ...] = field(default=())
    #: Regions that have a retrieved sentence, in region index order.
    region_sentences: tuple[RegionSentence, ...] = field(default=())
    #: The report's findings and impression as they may go into DICOM (cleaned, or "model output not usable").
    report_findings: str = ""
    report_impression: str = ""
    #: Which regions the TID 1500 SR's measurement groups hold: one of ``kinds.SR_ANATOMY_MODES``.
    sr_anatomy: str = "findings"

    # ---- identity ------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return int(self.source.Rows)

    @property
    def columns(self) -> int:
        return int(self.source.Columns)

    @property
    def demo(self) -> bool:
        return self.result.model.demo

    @property
    def study_instance_uid(self) -> str:
        return str(self.source.StudyInstanceUID)

    def sop_instance_uid(self, kind: str) -> str:
        model = self.result.model
        return derive_uid(self.uid_root, str(self.source.SOPInstanceUID), model.device_uid, self.analysis_version, kind)

    def series_instance_uid(self, kind: str) -> str:
        model = self.result.model
        return derive_series_uid(self.uid_root, self.study_instance_uid, model.device_uid, self.analysis_version, kind)

    def series_number(self, kind: str) -> int:
        return KINDS[kind].series_number

    def new_instance_identity(self, kind: str) -> dict[str, object]:
        """Keyword arguments every highdicom constructor gets: own series, deterministic UIDs, us."""
        return {
            "series_instance_uid": self.series_instance_uid(kind),
            "series_number": self.series_number(kind),
            "sop_instance_uid": self.sop_instance_uid(kind),
            "instance_number": 1,
            "manufacturer": MANUFACTURER,
        }

    def series_description(self, kind: str, detail: str = "") -> str:
        """LO (64), the kind first so that OHIF's narrow study browser tells the series apart, then
        ``detail`` (e.g. "none"), then the AI mark: "Findings SEG - AI, DEMO WEIGHTS - NOT FOR CLINICAL
        USE" or "Findings SR: none - AnatomiX AI v2, unverified" (at most 60 characters)."""
        version = f" v{self.analysis_version}" if self.analysis_version > 1 else ""
        head = KINDS[kind].title + (f": {detail}" if detail else "")
        mark = f"AI{version}, {DEMO_MARK}" if self.demo else f"AnatomiX AI{version}, unverified"
        return truncate(f"{head} - {mark}", "LO")

    def content_description(self, what: str) -> str:
        text = f"{DEMO_MARK}: {what}" if self.demo else f"AnatomiX {what}, AI generated, not verified"
        return truncate(text, "LO")

    @property
    def algorithm_name(self) -> str:
        return truncate(self.result.model.name, "LO")

    @property
    def algorithm_version(self) -> str:
        return truncate(self.result.model.version, "LO")

    @property
    def boxed(self) -> tuple[Annotation, ...]:
        return tuple(a for a in self.annotations if a.box is not None)

    @property
    def finding_boxes(self) -> tuple[Annotation, ...]:
        """The findings' boxes (what a viewer should draw at first opening), in ``boxed`` order."""
        return tuple(a for a in self.boxed if not a.is_region)

    @property
    def sr_boxed(self) -> tuple[Annotation, ...]:
        """The boxes the TID 1500 SR's measurement groups hold (``sr_anatomy``), in ``boxed`` order."""
        if self.sr_anatomy == "all":
            return self.boxed
        if self.sr_anatomy == "findings":
            return self.finding_boxes
        grounded = self.grounded_regions
        return tuple(a for a in self.boxed if not a.is_region or a in grounded)

    @property
    def grounded_regions(self) -> tuple[Annotation, ...]:
        """Located regions some finding is grounded to (:func:`grounded_annotations`), in ``boxed`` order."""
        kept = {a.key for a in grounded_annotations(self.annotations)}
        return tuple(a for a in self.boxed if a.is_region and a.key in kept)

    @property
    def unboxed_findings(self) -> tuple[Annotation, ...]:
        return tuple(a for a in self.annotations if a.box is None and not a.is_region)

    def procedure_reported(self) -> list[Code]:
        """IHE AIR: the imaging procedure (study's Procedure Code Sequence), else LOINC "XR unspecified
        body region" (in CID 100, which TID 1500 row 4 names; "XR Chest Single view" is not)."""
        procedures = [
            Code(str(item.CodeValue), str(item.CodingSchemeDesignator), truncate(str(item.get("CodeMeaning", item.CodeValue)), "LO"))
            for item in self.source.get("ProcedureCodeSequence", [])
            if item.get("CodeValue") and item.get("CodingSchemeDesignator")
        ]
        return procedures or [codes.XR_UNSPECIFIED_BODY_REGION]


def make_context(
    source: pydicom.Dataset,
    result: AnalysisResult,
    *,
    uid_root: str,
    analysis_version: int,
    institution_name: str = "",
    sr_anatomy: str = "findings",
) -> BundleContext:
    """Check the inputs and build the shared annotations; ValueError names what is wrong."""
    if sr_anatomy not in SR_ANATOMY_MODES:
        raise ValueError(f"sr_anatomy {sr_anatomy!r} must be one of {', '.join(SR_ANATOMY_MODES)}")
    check_source(source)
    source = normalised_source(source)
    check_uid_root(uid_root)
    if not isinstance(result, AnalysisResult):
        raise ValueError(f"result must be an inference.result.AnalysisResult, got {type(result).__name__}")
    if result.sop_instance_uid != str(source.SOPInstanceUID):
        raise ValueError(f"result.sop_instance_uid {result.sop_instance_uid!r} does not match source SOPInstanceUID {str(source.SOPInstanceUID)!r}")
    if (result.rows, result.columns) != (int(source.Rows), int(source.Columns)):
        raise ValueError(f"result image size {result.rows}x{result.columns} (rows x columns) does not match source {source.Rows}x{source.Columns}")
    if not is_valid_uid(result.model.device_uid):
        raise ValueError(f"result.model.device_uid {result.model.device_uid!r} is not a valid DICOM UID")
    if isinstance(analysis_version, bool) or not isinstance(analysis_version, int) or analysis_version < 1:
        raise ValueError(f"analysis_version {analysis_version!r} must be an integer >= 1")
    warnings: list[str] = []
    annotations = build_annotations(result, uid_root, analysis_version, warnings)
    image_labels = build_image_labels(result, uid_root, analysis_version)
    region_sentences = build_region_sentences(result)
    report_findings = report_impression = ""
    if result.report is not None:
        report_findings, reason = usable_model_text(result.report.findings)
        if reason is not None and result.report.findings.strip():
            warnings.append(f"report findings: model output not usable ({reason}); written as {report_findings!r}")
        report_impression, reason = usable_model_text(result.report.impression)
        if reason is not None and result.report.impression.strip():
            warnings.append(f"report impression: model output not usable ({reason}); written as {report_impression!r}")
    texts = [a.label for a in annotations] + [a.text for a in annotations] + [truncate(institution_name, "LO")]
    texts += [label.label for label in image_labels] + [r.sentence for r in region_sentences]
    texts += [report_findings, report_impression]
    return BundleContext(
        source=source,
        result=result,
        uid_root=uid_root,
        analysis_version=analysis_version,
        institution_name=truncate(institution_name, "LO"),
        annotations=tuple(annotations),
        character_set=character_set_for(source, texts),
        warnings=tuple(warnings),
        image_labels=image_labels,
        region_sentences=region_sentences,
        report_findings=report_findings,
        report_impression=report_impression,
        sr_anatomy=sr_anatomy,
    )


def grounded_annotations(annotations: tuple[Annotation, ...]) -> tuple[Annotation, ...]:
    """Findings with a box, and the located regions findings are grounded to (a region whose first
    site is a site of any finding, located or not); anatomy first, findings after. The one rule for
    "anatomy only where grounded" that the SC, the GSPS and the TID 1500 SR follow."""
    grounded_sites = {site for a in annotations if not a.is_region for site in a.sites}
    regions = [a for a in annotations if a.is_region and a.box is not None and a.sites and a.sites[0] in grounded_sites]
    return tuple(regions + [a for a in annotations if not a.is_region and a.box is not None])


#: Patient/study attributes our objects must carry (type 2: present, possibly empty). Real sources
#: sometimes omit some (pydicom's chrJapMulti.dcm has no StudyID); highdicom would then fail.
TYPE2_PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)  # fmt: skip


def normalised_source(source: pydicom.Dataset) -> pydicom.Dataset:
    """``source`` itself when usable as is, else a shallow copy (pixel data shared) with:

    * missing type 2 patient/study attributes present and empty;
    * Specific Character Set "ISO_IR 6" (not a defined term; highdicom refuses it) left out, which means the same;
    * an empty first Specific Character Set value (``\\ISO 2022 IR 87``, PS3.3 C.12.1.1.2: the default
      repertoire with code extensions) written as its defined term ``ISO 2022 IR 6``, which highdicom
      requires; the meaning is the same.
    """
    missing = [keyword for keyword in TYPE2_PATIENT_STUDY if keyword not in source]
    charset = source.get("SpecificCharacterSet")
    charset_fix = isinstance(charset, pydicom.multival.MultiValue) and len(charset) > 1 and not charset[0]
    default_charset = charset == "ISO_IR 6"  # seen in the field, no defined term: means the default repertoire
    if not missing and not charset_fix and not default_charset:
        return source
    completed = pydicom.Dataset(dict(source.items()))  # new element dict; the caller's dataset is untouched
    if hasattr(source, "file_meta"):
        completed.file_meta = source.file_meta
    for keyword in missing:
        setattr(completed, keyword, None)
    if charset_fix:
        completed.SpecificCharacterSet = ["ISO 2022 IR 6", *charset[1:]]
    if default_charset:
        del completed.SpecificCharacterSet
    return completed


def check_source(source: pydicom.Dataset) -> None:
    if not isinstance(source, pydicom.Dataset):
        raise ValueError(f"source must be a pydicom Dataset, got {type(source).__name__}")
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns") if k not in source]
    if missing:
        raise ValueError(f"source dataset lacks {', '.join(missing)}: it is not an image instance we can annotate")
    if int(source.get("NumberOfFrames", 1) or 1) != 1:
        raise ValueError(f"source has {source.NumberOfFrames} frames: only single-frame projection radiographs are supported")
    if int(source.get("SamplesPerPixel", 1)) != 1:
        raise ValueError("source is not a grayscale image (SamplesPerPixel != 1)")


def tracking_uid(result: AnalysisResult, uid_root: str, analysis_version: int, key: str) -> str:
    """Tracking UID of one annotation or image label: the same in SR, SEG and GSPS, and on every rebuild."""
    return derive_uid(uid_root, result.sop_instance_uid, result.model.device_uid, analysis_version, f"track/{key}")


def build_annotations(result: AnalysisResult, uid_root: str, analysis_version: int, warnings: list[str]) -> list[Annotation]:
    """Regions first (index order), then findings; one annotation per kept box."""

    def track(key: str) -> str:
        return tracking_uid(result, uid_root, analysis_version, key)

    annotations: list[Annotation] = []
    for position, region in enumerate(result.regions):
        if not 0 <= region.index < len(REGION_NAMES):
            raise ValueError(f"result.regions[{position}].index {region.index} is outside 0-{len(REGION_NAMES) - 1}")
        if region.box is None:
            warnings.append(f"region {region.index} ({REGION_NAMES[region.index]}) was not located; left out")
            continue
        box = clip_box(region.box, result.columns, result.rows, f"result.regions[{position}].box")
        if box is None:
            warnings.append(f"region {region.index} ({REGION_NAMES[region.index]}): box {region.box.as_list()} is empty inside the image; dropped")
            continue
        name = REGION_NAMES[region.index]
        annotations.append(
            Annotation(
                kind="region",
                key=region.id,
                tracking_id=truncate(f"{region.id} {name}", "LO"),
                tracking_uid=track(region.id),
                label=truncate(display_region_name(region.index), "LO"),
                name=truncate(display_region_name(region.index), "LO"),
                box=box,
                finding_type=codes.region_site(region.index).structure,
                sites=(codes.region_site(region.index),),
                probability=None,
                text=checked_sentence(region.retrieved_sentence, f"result.regions[{position}].retrieved_sentence") or "",
            )
        )
    for position, finding in enumerate(result.findings):
        for region_index in finding.region_indices:
            codes.region_site(region_index)  # ValueError names a bad index
        sites = tuple(dict.fromkeys(codes.region_site(i) for i in finding.region_indices))
        finding_type = codes.finding_type_for_label(finding.label)
        probability = check_probability(finding.probability, f"result.findings[{position}].probability")
        text, text_reason = usable_model_text(finding.text) if finding.text.strip() else ("", None)
        if text_reason:
            warnings.append(f"finding {finding.index} text: model output not usable ({text_reason})")
        if finding.label.strip():
            label_text, label_reason = usable_model_text(finding.label, multiline=False)
            if label_reason:
                warnings.append(f"finding {finding.index} label: model output not usable ({label_reason})")
        else:  # no label: its text names it
            label_text = " ".join(text.split()) if text and not text_reason else "finding"
        shown = f"{label_text} {probability:.2f}" if probability is not None else label_text
        kept = 0
        for box_number, raw in enumerate(finding.boxes, start=1):
            box = clip_box(raw, result.columns, result.rows, f"result.findings[{position}].boxes[{box_number - 1}]")
            if box is None:
                warnings.append(f"finding {finding.index} ({label_text!r}): box {raw.as_list()} is empty inside the image; dropped")
                continue
            kept += 1
            key = finding.id if len(finding.boxes) == 1 else f"{finding.id}-box{box_number}"
            annotations.append(_finding_annotation(key, track(key), label_text, shown, box, finding_type, sites, probability, text))
        if kept == 0:
            # No usable box: the finding is still reported, as a whole-image statement.
            annotations.append(_finding_annotation(finding.id, track(finding.id), label_text, shown, None, finding_type, sites, probability, text))
    return annotations


def _finding_annotation(
    key: str,
    tracking_uid: str,
    label_text: str,
    shown: str,
    box: Box | None,
    finding_type: Code,
    sites: tuple[codes.AnatomicSite, ...],
    probability: float | None,
    text: str,
) -> Annotation:
    return Annotation(
        kind="finding",
        key=key,
        tracking_id=truncate(f"{key} {label_text}", "LO"),
        tracking_uid=tracking_uid,
        label=truncate(shown, "LO"),
        name=truncate(label_text, "LO"),
        box=box,
        finding_type=finding_type,
        sites=sites,
        probability=probability,
        text=text,
    )


def build_image_labels(result: AnalysisResult, uid_root: str, analysis_version: int) -> tuple[ImageLabel, ...]:
    """``result.image_labels`` checked and sorted by label; ValueError names a bad label or probability."""
    if not isinstance(result.image_labels, dict):
        raise ValueError(f"result.image_labels must be a dict of label -> probability, got {type(result.image_labels).__name__}")
    labels: list[ImageLabel] = []
    keys: dict[str, str] = {}
    for label, value in sorted(result.image_labels.items(), key=lambda item: str(item[0])):
        where = f"result.image_labels[{label!r}]"
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"{where}: a label must be a non-empty string")
        if value is None:
            raise ValueError(f"{where} = None: a probability must be a number in [0, 1]")
        probability = check_probability(value, where)
        assert probability is not None
        name = " ".join(clean_model_text(label, multiline=False).split())
        if not name:
            raise ValueError(f"{where}: a label must hold printable text")
        slug = re.sub(r"\W+", "-", name.casefold()).strip("-_") or "label"
        key = f"image-label-{slug}"
        if key in keys:
            raise ValueError(f"{where}: the same label as {keys[key]!r} once case and punctuation are ignored")
        keys[key] = label
        labels.append(
            ImageLabel(
                label=name,
                probability=probability,
                key=key,
                tracking_id=truncate(f"image-label {name}", "LO"),
                tracking_uid=tracking_uid(result, uid_root, analysis_version, key),
                finding_type=codes.finding_type_for_label(name),
            )
        )
    return tuple(labels)


def build_region_sentences(result: AnalysisResult) -> tuple[RegionSentence, ...]:
    """The regions that have a retrieved sentence, in index order (located or not)."""
    sentences = []
    for position, region in sorted(enumerate(result.regions), key=lambda item: item[1].index):
        sentence = checked_sentence(region.retrieved_sentence, f"result.regions[{position}].retrieved_sentence")
        if sentence:  # build_annotations has already checked the index
            sentences.append(RegionSentence(region.index, display_region_name(region.index), sentence))
    return tuple(sentences)


def checked_sentence(value: object, where: str) -> str | None:
    """A retrieved sentence with whitespace collapsed; None for None or blank; ValueError for a non-string."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string or None, got {type(value).__name__}")
    return " ".join(clean_model_text(value, multiline=False).split()) or None


def display_region_name(index: int) -> str:
    """A readable region name ("Cardiac shadow viewed radiologically or Heart" -> "Heart")."""
    name = REGION_NAMES[index]
    name = name.replace("Cardiac shadow viewed radiologically or Heart", "Heart").replace("Right atrial structure", "Right atrium")
    name = name.replace("Structure of ", "").replace(" structure", "").replace(" viewed radiologically", "")
    if name == "cavoatrial":
        name = "Cavoatrial junction"
    return name[:1].upper() + name[1:]


def clip_box(box: Box, columns: int, rows: int, where: str) -> Box | None:
    """The box clipped to [0, columns] x [0, rows]; None when nothing is left; ValueError when not finite."""
    values = (box.x1, box.y1, box.x2, box.y2)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise ValueError(f"{where} has a coordinate that is not a finite number: {list(values)}")
    x1, x2 = sorted((min(max(box.x1, 0.0), columns), min(max(box.x2, 0.0), columns)))
    y1, y2 = sorted((min(max(box.y1, 0.0), rows), min(max(box.y2, 0.0), rows)))
    if box.x2 <= box.x1 or box.y2 <= box.y1:
        return None  # an inverted or zero box is degenerate, not something to "fix" by sorting
    clipped = Box(float(x1), float(y1), float(x2), float(y2))
    # Less than one pixel across cannot be drawn or segmented meaningfully.
    return None if clipped.width < 1.0 or clipped.height < 1.0 else clipped


def check_probability(value: float | None, where: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{where} = {value!r}: a probability must be a number in [0, 1]")
    return float(value)
