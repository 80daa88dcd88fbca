"""Batched analysis across studies: one analyze task decodes the images of many queued studies at once.

With ``model.max_batch > 1`` the analyze task that claimed a study does not analyse it alone. It also
claims (compare-and-set ``queued -> analyzing``, straight in the state store) other queued studies
until ``max_batch`` images are in flight, waiting at most ``model.batch_wait_ms`` for a batch to
fill, and feeds them all to one :class:`inference.batching.ContinuousBatcher`. While it decodes it
keeps claiming queued studies as rows free up, so a finished sequence leaves and a waiting one joins.

Per study, the rules of the single-study task hold:

* each claimed study has its own lease, renewed while it is in flight and cleared when it is
  finished; a worker killed mid-batch stops renewing them, and the node's dispatch loop puts every
  one of its studies back to ``queued`` (results already recorded are reused, not recomputed);
* a study is finished (``analyzed`` and handed to delivery, or ``failed`` / ``done``) only once
  every one of its images has its result recorded;
* the Celery message of a study claimed this way is acknowledged later by its own task, which finds
  the study claimed or done and does nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from celery import Celery
from pydicom.dataset import Dataset

from dicom_node.pipeline.analysis import (
    ImageUnusable,
    StudyAnalysis,
    instances_to_analyse,
    kinds_for_study,
    prepare_source,
    read_source,
    record_analysis,
)
from dicom_node.pipeline.dispatch import clear_lease, write_lease
from dicom_node.settings import Settings
from dicom_node.store.base import InstanceRecord, ProducedObject, Store, StoreUnavailable, StudyRecord

if TYPE_CHECKING:
    from inference.engine import Engine

LOG = logging.getLogger(__name__)


class AnalyzeContext(Protocol):
    """What a batch needs of its worker (:class:`dicom_node.pipeline.tasks.WorkerContext` is one)."""

    settings: Settings

    def store(self) -> Store: ...

    def engine(self) -> Engine: ...


class LeaseKeeper:
    """Renews the analyze lease of every study in flight from one thread (a third of ``lease_s``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._studies: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-analyze-batch", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def add(self, uid: str, version: int) -> None:
        write_lease(self.settings, "analyze", uid, version, self.settings.queue.lease_s)
        with self._lock:
            self._studies.add((uid, version))

    def release(self, uid: str, version: int, clear: bool = True) -> None:
        with self._lock:
            self._studies.discard((uid, version))
        if clear:
            clear_lease(self.settings, "analyze", uid, version)

    def _run(self) -> None:
        period = max(0.2, self.settings.queue.lease_s / 3)
        while not self._stop.wait(period):
            with self._lock:
                studies = list(self._studies)
            for uid, version in studies:
                write_lease(self.settings, "analyze", uid, version, self.settings.queue.lease_s)


@dataclass
class _StudyWork:
    study: StudyRecord
    kinds: tuple[str, ...]
    out_dir: Path
    started: float
    report: StudyAnalysis = field(default_factory=StudyAnalysis)
    #: SOP Instance UID -> (instance, source dataset) of images whose result is not recorded yet.
    pending: dict[str, tuple[InstanceRecord, Dataset]] = field(default_factory=dict)


class BatchRun:
    """One analyze task's batch: claims studies, runs the batcher, records and finishes each study."""

    def __init__(self, ctx: AnalyzeContext, app: Celery, finish) -> None:
        self.ctx, self.app, self.finish = ctx, app, finish
        self.settings = ctx.settings
        self.store: Store = ctx.store()
        self.max_batch = self.settings.model.max_batch
        self.studies: dict[tuple[str, int], _StudyWork] = {}
        self.batcher = None
        #: Claiming stops after half the task's time limit; what is in flight then is finished.
        self.claim_until = time.monotonic() + self.settings.queue.analyze_time_limit_s / 2

    def run(self, first: StudyRecord) -> dict[str, str]:
        """Analyse ``first`` (already claimed) and whatever else joins; returns study UID -> outcome."""
        from inference.batching import ContinuousBatcher

        outcomes: dict[str, str] = {}
        with LeaseKeeper(self.settings) as leases:
            self.leases = leases
            leases.add(first.study_instance_uid, first.version)
            try:
                self.batcher = ContinuousBatcher(self.ctx.engine(), self.settings.model.tasks, slots=self.max_batch)
                self._start_study(first, outcomes)
                self._claim_more(outcomes, wait_s=self.settings.model.batch_wait_ms / 1000)
                last_claim = time.monotonic()
                while not self.batcher.idle:
                    for (uid, version, sop_uid), result in self.batcher.step():
                        self._record(uid, version, sop_uid, result, outcomes)
                    if time.monotonic() - last_claim > 0.25:
                        self._claim_more(outcomes, wait_s=0.0)
                        last_claim = time.monotonic()
            except StoreUnavailable:
                for uid, version in list(self.studies):
                    leases.release(uid, version, clear=False)  # leases run out; dispatch re-queues them
                raise
            except Exception as exc:  # task boundary: a model error fails the studies in flight, recorded
                LOG.exception("batched analysis failed with %d studies in flight", len(self.studies))
                in_flight = {(first.study_instance_uid, first.version)} if first.study_instance_uid not in outcomes else set()
                for uid, version in in_flight | set(self.studies):
                    self.store.transition_study(uid, version, ("analyzing",), "failed", error=f"analysis failed: {exc}")
                    leases.release(uid, version)
                    outcomes[uid] = "failed"
                self.studies.clear()
        return outcomes

    # ---- claiming ----------------------------------------------------------------------------------
    def _claim_more(self, outcomes: dict[str, str], wait_s: float) -> None:
        """Claim queued studies while fewer than ``max_batch`` images are in flight (waiting up to
        ``wait_s`` for more to be queued)."""
        deadline = time.monotonic() + wait_s
        while self.batcher.images_in_flight < self.max_batch and time.monotonic() < self.claim_until:
            queued = sorted(self.store.list_studies(states=("queued",), limit=4 * self.max_batch), key=lambda s: s.created_at)
            claimed = False
            for study in queued:
                if self.batcher.images_in_flight >= self.max_batch:
                    break
                key = (study.study_instance_uid, study.version)
                if self.store.transition_study(study.study_instance_uid, study.version, ("queued",), "analyzing"):
                    if key in self.studies:
                        # ours already: dispatch took a late lease renewal (a starved process) for a
                        # dead worker and re-queued it; we hold it again, its images are in flight
                        LOG.warning("study %s v%d was re-queued while in this batch; kept", *key)
                        self.leases.add(*key)
                        continue
                    current = self.store.get_study(study.study_instance_uid)
                    if current is not None and current.version == study.version and current.state == "analyzing":
                        self._start_study(current, outcomes)
                        claimed = True
            if claimed or time.monotonic() >= deadline:
                if not claimed:
                    return
                continue
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def _start_study(self, study: StudyRecord, outcomes: dict[str, str]) -> None:
        uid, version = study.study_instance_uid, study.version
        self.leases.add(uid, version)
        work = _StudyWork(study, kinds_for_study(self.store, self.settings, study),
                          self.settings.storage.results_dir / uid / f"v{version}", time.monotonic())  # fmt: skip
        self.studies[(uid, version)] = work
        from inference.result import AnalysisResult

        done = {a.sop_instance_uid: a for a in self.store.list_analyses(uid, version) if a.status == "analyzed" and a.result_json}
        for instance in instances_to_analyse(self.store, self.settings, study, work.report):
            sop_uid = instance.sop_instance_uid
            try:
                source = read_source(self.settings.storage.spool_dir / instance.path)
                if sop_uid in done:  # a re-queued study: reuse the stored result
                    self._write(work, instance, source, AnalysisResult.from_json(done[sop_uid].result_json))
                    continue
                prepared = prepare_source(source)
            except ImageUnusable as exc:
                LOG.warning("study %s v%d: an instance failed: %s", uid, version, exc)
                record_analysis(self.store, instance, version, None, str(exc))
                work.report.failed[sop_uid] = str(exc)
                continue
            work.pending[sop_uid] = (instance, source)
            self.batcher.submit((uid, version, sop_uid), prepared)
        if not work.pending:
            self._finish(work, outcomes)

    # ---- results -------------------------------------------------------------------------------------
    def _record(self, uid: str, version: int, sop_uid: str, result, outcomes: dict[str, str]) -> None:
        work = self.studies[(uid, version)]
        instance, source = work.pending.pop(sop_uid)
        record_analysis(self.store, instance, version, result, None)
        self._write(work, instance, source, result)
        if not work.pending:
            self._finish(work, outcomes)

    def _write(self, work: _StudyWork, instance: InstanceRecord, source: Dataset, result) -> None:
        from dicom_node.pipeline.analysis import write_result_objects

        uid, version = work.study.study_instance_uid, work.study.version
        for obj in write_result_objects(source, result, work.kinds, self.settings, version, work.out_dir):
            self.store.record_produced_object(
                ProducedObject(uid, version, instance.sop_instance_uid, obj.kind, obj.sop_instance_uid, obj.sop_class_uid,
                               str(obj.path.relative_to(self.settings.storage.results_dir)), datetime.now(UTC))
            )  # fmt: skip
            work.report.objects += 1
        work.report.analyzed.append(instance.sop_instance_uid)

    def _finish(self, work: _StudyWork, outcomes: dict[str, str]) -> None:
        uid, version = work.study.study_instance_uid, work.study.version
        del self.studies[(uid, version)]
        outcomes[uid] = self.finish(uid, version, work.report, work.started)
        self.leases.release(uid, version)
