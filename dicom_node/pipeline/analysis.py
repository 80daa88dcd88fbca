"""Analysis of one study version: spool -> engine -> result JSON -> bundles -> produced objects.

Used by the ``analyze`` Celery task and, without the store and the network, by the offline
``anatomix-node analyze`` command. Torch and the writer are imported only when a function needs
them, so the node and the deliver workers never load the model.

Idempotent: an instance whose analysis is already stored is not run again; the writer's UIDs are
deterministic (source SOP Instance UID, model device UID, analysis version, kind), so writing the
bundle again overwrites the same files and records nothing new.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.pipeline.dispatch import NO_MODEL_ERROR
from dicom_node.settings import Settings
from dicom_node.store.base import AnalysisRecord, InstanceRecord, ProducedObject, Store, StudyRecord

if TYPE_CHECKING:
    from inference.engine import Engine
    from inference.result import AnalysisResult

LOG = logging.getLogger(__name__)


class NoModelConfigured(RuntimeError):
    """Neither ``model.dir`` nor ``model.demo_weights`` is set: the node stores but does not analyse."""


class ImageUnusable(ValueError):
    """This image cannot be analysed (unreadable file, pixels that do not decode, unusable geometry)."""


# ---- model -----------------------------------------------------------------------------------------


def resolve_model_dir(settings: Settings) -> Path:
    """The model directory to load: ``model.dir``, else the cached tiny demo weights, else an error."""
    if settings.model.dir is not None:
        return settings.model.dir
    if settings.model.demo_weights:
        from inference.demo_weights import ensure_demo_weights

        return ensure_demo_weights(settings.storage.data_dir.resolve() / "models", size="tiny")
    raise NoModelConfigured(NO_MODEL_ERROR)


def load_engine(settings: Settings, device: str | None = None) -> Engine:
    """Load the engine once (per worker process, after fork)."""
    from inference.engine import Engine, EngineOptions
    from inference.lm.cpu_precision import cpu_threads
    from inference.prompt import system_prompt_text

    model_dir = resolve_model_dir(settings)
    options = EngineOptions(
        backend=settings.model.backend,
        device=device or settings.model.device,
        max_new_tokens=settings.model.max_new_tokens,
        stop_at_end_of_turn=settings.model.stop_at_end_of_turn,
        system_prompt=system_prompt_text(settings.model.system_prompt),
        cpu_precision=settings.model.cpu_precision,
        # bf16/int8 (full-size weights): model.cpu_threads, 0 = every core this worker may use (its
        # affinity mask, not the machine's count). fp32 (tiny/demo weights) keeps torch's setting.
        cpu_threads=(settings.model.cpu_threads or cpu_threads()) if settings.model.cpu_precision != "fp32" else None,
    )
    engine = Engine.load(model_dir, options)
    LOG.info("model loaded from %s on %s (demo=%s)", model_dir, device or settings.model.device, engine.identity.demo)
    return engine


# ---- images ----------------------------------------------------------------------------------------


def read_source(path: Path) -> Dataset:
    """Read a spooled or user-given DICOM file, or raise ImageUnusable saying why."""
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:  # pydicom's text suggests force=True, which is no advice for a user
        raise ImageUnusable(f"cannot read {path.name}: not a DICOM file (no 'DICM' prefix and File Meta header)") from None
    except (OSError, EOFError, ValueError) as exc:
        raise ImageUnusable(f"cannot read {path.name} as DICOM: {exc}") from None


def prepare_source(ds: Dataset) -> Any:
    """Decode the pixels and letterbox them (a PreparedImage), or raise ImageUnusable with the decoder's reason."""
    from inference.preprocess import PreprocessError, prepare_dataset

    try:
        _ = ds.pixel_array  # decode first, so a decoder failure is reported as such
    except Exception as exc:  # decoder plugins raise many types; this image fails, the others go on
        raise ImageUnusable(f"pixel data cannot be decoded: {type(exc).__name__}: {exc}") from None
    try:
        return prepare_dataset(ds)
    except PreprocessError as exc:
        raise ImageUnusable(str(exc)) from None


@dataclass(frozen=True)
class ImageOutcome:
    """The analysis of one source image: a result, or the reason there is none."""

    sop_instance_uid: str
    result: AnalysisResult | None
    error: str | None = None


def analyze_datasets(engine: Engine, datasets: list[Dataset], tasks: tuple[str, ...]) -> list[ImageOutcome]:
    """Run the engine on every usable image (one batch); unusable ones get their reason instead."""
    prepared, outcomes = [], {}
    for ds in datasets:
        uid = str(ds.get("SOPInstanceUID", ""))
        try:
            prepared.append((uid, prepare_source(ds)))
        except ImageUnusable as exc:
            outcomes[uid] = ImageOutcome(uid, None, str(exc))
    if prepared:
        results = engine.analyze([image for _, image in prepared], tasks)
        for (uid, _), result in zip(prepared, results):
            outcomes[uid] = ImageOutcome(uid, result)
    return [outcomes[str(ds.get("SOPInstanceUID", ""))] for ds in datasets]


# ---- writing ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrittenObject:
    kind: str
    sop_instance_uid: str
    sop_class_uid: str
    path: Path


def write_result_objects(
    source: Dataset, result: AnalysisResult, kinds: tuple[str, ...], settings: Settings, version: int, out_dir: Path
) -> list[WrittenObject]:
    """Build the bundle for one source image and write each object as ``<kind>-<uid>.dcm`` (atomic)."""
    from sr_writer.bundle import build_bundle

    built = build_bundle(
        source,
        result,
        kinds,
        uid_root=settings.output.uid_root,
        analysis_version=version,
        institution_name=settings.output.institution_name,
        sr_anatomy=settings.output.sr_anatomy,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for obj in built:
        ds = obj.dataset
        path = out_dir / f"{obj.kind}-{ds.SOPInstanceUID}.dcm"
        temp = path.with_suffix(f".{os.getpid()}.tmp")
        ds.save_as(temp, enforce_file_format=True)
        os.replace(temp, path)
        written.append(WrittenObject(obj.kind, str(ds.SOPInstanceUID), str(ds.SOPClassUID), path))
    return written


def kinds_for_study(store: Store, settings: Settings, study: StudyRecord) -> tuple[str, ...]:
    """Union of the object kinds the study's destinations ask for (the default profile when none)."""
    from dicom_node.pipeline.delivery import route_destinations

    profiles = [node.profile for node in route_destinations(store, study, settings)] or [settings.output.default_profile]
    kinds: list[str] = []
    for profile in profiles:
        kinds += [k for k in settings.output.profile(profile) if k not in kinds]
    return tuple(kinds)


# ---- one study version -----------------------------------------------------------------------------


@dataclass
class StudyAnalysis:
    analyzed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    objects: int = 0

    def summary(self) -> str:
        parts = [f"{len(self.analyzed)} analysed"]
        if self.failed:
            parts.append(f"{len(self.failed)} failed (" + "; ".join(self.failed.values()) + ")")
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped (" + "; ".join(sorted(set(self.skipped.values()))) + ")")
        return ", ".join(parts)


def instances_to_analyse(store: Store, settings: Settings, study: StudyRecord, report: StudyAnalysis) -> list[InstanceRecord]:
    """The study version's instances the selection rules choose; the others are recorded as skipped."""
    from dicom_node.pipeline.selection import select_instance

    chosen = []
    for instance in store.list_instances(study.study_instance_uid, study.version):
        if instance.state in ("selected", "analyzed", "failed"):
            chosen.append(instance)
            continue
        if instance.state == "skipped":
            report.skipped[instance.sop_instance_uid] = instance.reason or "skipped"
            continue
        try:
            header = pydicom.dcmread(settings.storage.spool_dir / instance.path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            chosen.append(instance)  # analysing it records the reader's reason as the failure
            continue
        decision = select_instance(header, settings.output.uid_root)
        if decision.selected:
            store.set_instance_state(instance.id, "selected", decision.reason)
            chosen.append(instance)
        else:
            store.set_instance_state(instance.id, "skipped", decision.reason)
            report.skipped[instance.sop_instance_uid] = decision.reason
    return chosen


def analyze_study_version(store: Store, settings: Settings, engine: Engine, study: StudyRecord) -> StudyAnalysis:
    """Analyse the selected instances, store results and produced objects; return what happened."""
    from inference.result import AnalysisResult

    uid, version = study.study_instance_uid, study.version
    report = StudyAnalysis()
    done = {a.sop_instance_uid: a for a in store.list_analyses(uid, version) if a.status == "analyzed" and a.result_json}
    kinds = kinds_for_study(store, settings, study)
    out_dir = settings.storage.results_dir / uid / f"v{version}"
    for instance in instances_to_analyse(store, settings, study, report):
        try:
            source = read_source(settings.storage.spool_dir / instance.path)
            if instance.sop_instance_uid in done:  # a redelivered task: reuse the stored result
                outcome = ImageOutcome(instance.sop_instance_uid, AnalysisResult.from_json(done[instance.sop_instance_uid].result_json))
            else:
                outcome = analyze_datasets(engine, [source], settings.model.tasks)[0]
        except ImageUnusable as exc:
            outcome = ImageOutcome(instance.sop_instance_uid, None, str(exc))
        if outcome.result is None:
            LOG.warning("study %s v%d: an instance failed: %s", uid, version, outcome.error)
            record_analysis(store, instance, version, None, outcome.error)
            report.failed[instance.sop_instance_uid] = outcome.error or "failed"
            continue
        if instance.sop_instance_uid not in done:
            record_analysis(store, instance, version, outcome.result, None)
        for obj in write_result_objects(source, outcome.result, kinds, settings, version, out_dir):
            store.record_produced_object(
                ProducedObject(uid, version, instance.sop_instance_uid, obj.kind, obj.sop_instance_uid, obj.sop_class_uid,
                               str(obj.path.relative_to(settings.storage.results_dir)), datetime.now(UTC))
            )  # fmt: skip
            report.objects += 1
        report.analyzed.append(instance.sop_instance_uid)
    return report


def record_analysis(store: Store, instance: InstanceRecord, version: int, result: AnalysisResult | None, error: str | None) -> None:
    status = "analyzed" if result is not None else "failed"
    store.save_analysis(
        AnalysisRecord(instance.study_instance_uid, version, instance.sop_instance_uid, status,
                       result.to_json() if result is not None else None, error, datetime.now(UTC))
    )  # fmt: skip
    if instance.id is not None:
        store.set_instance_state(instance.id, status, error)
