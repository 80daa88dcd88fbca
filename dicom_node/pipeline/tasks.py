"""The ``analyze`` and ``deliver`` Celery tasks. Arguments are IDs only: (study UID, version).

Each task claims its study with a compare-and-set state transition, so a duplicate or redelivered
message finds the work claimed or done and does nothing. While it works it renews a lease
(:class:`dicom_node.pipeline.dispatch.Heartbeat`); if the worker dies the lease runs out and the node's
dispatch loop queues the work again. The model and the store connection are opened lazily, once per
worker process (after the fork of a prefork pool), by :class:`WorkerContext`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from celery import Celery
from kombu.exceptions import OperationalError

from dicom_node.audit import trail as audit
from dicom_node.pipeline import queue
from dicom_node.pipeline.dispatch import Heartbeat, clear_lease, write_lease
from dicom_node.pipeline.routing import NO_DESTINATION, NO_DESTINATION_NOTE
from dicom_node.settings import Settings
from dicom_node.store.base import Store, StoreUnavailable, StudyRecord

if TYPE_CHECKING:
    from dicom_node.pipeline.delivery import DeliveryRound
    from dicom_node.pipeline.remote_worker import NodeClient
    from inference.engine import Engine

LOG = logging.getLogger(__name__)


class WorkerContext:
    """Per-process resources of a worker: settings, a store connection, the engine (lazily)."""

    def __init__(self, settings: Settings, device: str | None = None, node: NodeClient | None = None) -> None:
        self.settings = settings
        self.device = device
        #: A remote worker's link to the node (no store, no shared data_dir): analyses go over HTTP.
        self.node = node
        self._store: Store | None = None
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()
        #: Called with the reason when the warm-up finds the model unusable (``worker`` stops itself).
        self.on_unusable: Callable[[str], None] | None = None
        #: Called when the warm-up starts loading, then with (engine, seconds) or (None, seconds, reason) when it ends.
        self.on_warm_up: Callable[..., None] | None = None

    def store(self) -> Store:
        if self._store is None:
            from dicom_node.store import open_store

            self._store = open_store(self.settings.database_url)
        return self._store

    def engine(self) -> Engine:
        with self._engine_lock:  # the warm-up thread and the first task may both ask
            if self._engine is None:
                from dicom_node.pipeline.analysis import load_engine

                self._engine = load_engine(self.settings, self.device)
            return self._engine

    def warm_up(self) -> None:
        """Load the model in the background right after the pool process starts (after the fork),
        so the first study does not wait for it. A model that cannot be loaded (a corrupt or
        mismatched checkpoint: the files exist, so the worker's start-up check passed) is reported
        in one line through ``on_unusable``, which stops the worker; without it the first task
        loads again and records the error."""

        def load() -> None:
            started = time.monotonic()
            try:
                engine = self.engine()
            except Exception as exc:  # thread boundary: reported, never a traceback in the admin's log
                reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
                LOG.debug("model warm-up failed", exc_info=True)
                if self.on_warm_up is not None:
                    self.on_warm_up(None, time.monotonic() - started, reason)
                if self.on_unusable is None:
                    LOG.error("model warm-up failed (%s); the first analysis will try again", reason)
                else:
                    self.on_unusable(reason)
                return
            if self.on_warm_up is not None:
                self.on_warm_up(engine, time.monotonic() - started)

        threading.Thread(target=load, name="model-warm-up", daemon=True).start()


def run_analyze(ctx: WorkerContext, app: Celery, study_instance_uid: str, version: int) -> str:
    """Claim the study version (queued -> analyzing), analyse it, hand it to delivery. Returns what happened."""
    from dicom_node.pipeline.analysis import analyze_study_version

    if ctx.node is not None:  # a worker on another host: the same steps over the node's HTTP service
        from dicom_node.pipeline.remote_worker import analyze_remote_study

        return analyze_remote_study(ctx.node, ctx.engine, study_instance_uid, version)
    store, settings = ctx.store(), ctx.settings
    if settings.model.max_batch > 1:
        try:  # load before claiming: a batch claims studies only once it can run them at once
            ctx.engine()
        except Exception:  # the claim below records the failure against the study, as a single task does
            LOG.exception("model load failed")
    if not store.transition_study(study_instance_uid, version, ("queued",), "analyzing"):
        study = store.get_study(study_instance_uid)
        state = f"{study.state} v{study.version}" if study else "unknown"
        LOG.info("analyze %s v%d: nothing to do (study is %s)", study_instance_uid, version, state)
        return "skipped"
    started = time.monotonic()
    if settings.model.max_batch > 1:  # this study and other queued ones, decoded together
        from dicom_node.pipeline.batch_analysis import BatchRun

        study = store.get_study(study_instance_uid)
        if study is None:  # purged between the claim and now
            return "skipped"
        finish = lambda uid, v, report, t0: finish_analysis(store, settings, app, uid, v, report, t0)  # noqa: E731
        outcomes = BatchRun(ctx, app, finish).run(study)
        return outcomes.get(study_instance_uid, "failed")
    with Heartbeat(settings, "analyze", study_instance_uid, version):
        study = store.get_study(study_instance_uid)
        if study is None:  # purged between the claim and now
            return "skipped"
        try:
            report = analyze_study_version(store, settings, ctx.engine(), study)
        except StoreUnavailable:
            raise  # leave it "analyzing": the lease runs out and dispatch queues it again
        except Exception as exc:  # task boundary: a model or writer error fails this study, recorded and logged
            LOG.exception("analyze %s v%d failed", study_instance_uid, version)
            store.transition_study(study_instance_uid, version, ("analyzing",), "failed", error=f"analysis failed: {exc}")
            audit.record_study_analysed(store, settings, study_instance_uid, version, "failed", type(exc).__name__)
            clear_lease(settings, "analyze", study_instance_uid, version)
            return "failed"
    outcome = finish_analysis(store, settings, app, study_instance_uid, version, report, started)
    clear_lease(settings, "analyze", study_instance_uid, version)
    return outcome


def finish_analysis(store: Store, settings: Settings, app: Celery, study_instance_uid: str, version: int, report, started: float) -> str:
    """Move an analysed study version on (analyzed + queue delivery, failed, or done) once every
    image has its result recorded; returns the outcome."""
    LOG.info("analyze %s v%d: %s in %.1f s", study_instance_uid, version, report.summary(), time.monotonic() - started)
    audit.record_study_analysed(
        store, settings, study_instance_uid, version, "analyzed" if report.analyzed else ("failed" if report.failed else "nothing"), report.summary()
    )
    note = report.summary() if (report.failed or report.skipped) else None
    if report.analyzed:
        store.transition_study(study_instance_uid, version, ("analyzing",), "analyzed", error=note)
        try:
            queue.send_deliver(app, study_instance_uid, version)
        except (OperationalError, OSError) as exc:  # broker down: dispatch re-sends "analyzed" studies
            LOG.error("analyze %s v%d: could not queue the delivery (%s); dispatch will", study_instance_uid, version, exc)
        return "analyzed"
    if report.failed:
        store.transition_study(study_instance_uid, version, ("analyzing",), "failed", error=f"no image could be analysed: {note}")
        return "failed"
    store.transition_study(study_instance_uid, version, ("analyzing",), "done", error=f"nothing to analyse: {note or 'no images'}")
    return "nothing"


def run_deliver(ctx: WorkerContext, app: Celery, study_instance_uid: str, version: int) -> str:
    """Send what is owed to every destination that is due; plan the next try, or finish the study.

    Each destination has its own retry plan (see :func:`dicom_node.pipeline.delivery.deliver_study_version`):
    the study stays ``delivering`` while any destination is still being retried, and ends ``done``
    when at least one destination got everything (the note names any destination that did not, and
    why), ``failed`` when none did.
    """
    from dicom_node.pipeline.delivery import deliver_study_version
    from sr_writer.bundle import comprehensive_sr_fallback

    store, settings = ctx.store(), ctx.settings
    before = store.get_study(study_instance_uid)
    # transition_study replaces the error column: carry the analysis note (e.g. a failed image) along.
    note = before.error if before is not None and before.state == "analyzed" else None
    store.transition_study(study_instance_uid, version, ("analyzed",), "delivering", error=note)
    study = store.get_study(study_instance_uid)
    if study is None or study.version != version or study.state != "delivering":
        LOG.info("deliver %s v%d: nothing to do (study is %s)", study_instance_uid, version, study.state if study else "unknown")
        return "skipped"
    with Heartbeat(settings, "deliver", study_instance_uid, version):
        summary = deliver_study_version(store, settings, study, fallback=comprehensive_sr_fallback)
    if not summary.finished:
        delay = summary.next_attempt_in or 0.0
        # The lease covers the wait, so dispatch re-queues only if this retry message is lost.
        write_lease(settings, "deliver", study_instance_uid, version, delay + settings.queue.lease_s)
        queue.send_deliver(app, study_instance_uid, version, countdown=delay)
        return "retrying"
    clear_lease(settings, "deliver", study_instance_uid, version)
    return finish_delivery(store, study, summary)


def finish_delivery(store: Store, study: StudyRecord, summary: DeliveryRound) -> str:
    """delivering -> done | failed once every destination is settled; returns the final state."""
    uid, version = study.study_instance_uid, study.version
    analysis_note = _analysis_note(study.error)
    missing = summary.outcome_text()
    error = "; ".join(filter(None, [analysis_note, missing])) or None
    final = "done" if any(d.complete for d in summary.destinations) or not summary.destinations else "failed"
    if not summary.destinations:  # done, but flagged: the study's outcome is "undelivered"
        error = "; ".join(filter(None, [analysis_note, NO_DESTINATION_NOTE]))
        LOG.warning("study %s v%d undelivered: %s", uid, version, NO_DESTINATION_NOTE)
    store.transition_study(uid, version, ("delivering",), final, error=error)
    if missing:
        LOG.warning("study %s v%d %s: %s", uid, version, final, missing)
    return final


def _analysis_note(error: str | None) -> str | None:
    """The analysis part of a study's note, without the text of an earlier delivery (a resend replaces it)."""
    if not error:
        return None
    found = [i for i in (error.find("not delivered to "), error.find("delivered to "), error.find(NO_DESTINATION)) if i >= 0]
    return error[: min(found)].rstrip("; ") or None if found else error


def register_tasks(app: Celery, ctx: WorkerContext, warm_up: bool = False) -> None:
    """Register the two tasks on ``app`` with limits below the broker's visibility timeout.

    ``warm_up``: load the model in each pool process as soon as it starts (analyze workers).
    """
    limits = ctx.settings.queue
    if warm_up:
        from celery.signals import worker_process_init

        worker_process_init.connect(lambda **_: ctx.warm_up(), weak=False)

    @app.task(name=queue.ANALYZE_TASK, time_limit=limits.analyze_time_limit_s, soft_time_limit=_soft(limits.analyze_time_limit_s))
    def analyze(study_instance_uid: str, version: int) -> str:
        return run_analyze(ctx, app, study_instance_uid, int(version))

    @app.task(name=queue.DELIVER_TASK, time_limit=limits.deliver_time_limit_s, soft_time_limit=_soft(limits.deliver_time_limit_s))
    def deliver(study_instance_uid: str, version: int) -> str:
        return run_deliver(ctx, app, study_instance_uid, int(version))


def _soft(hard_limit_s: int) -> float:
    """Soft limit a little before the hard one, so a task can record its failure before it is killed."""
    return max(1.0, hard_limit_s - min(30.0, hard_limit_s * 0.1))
