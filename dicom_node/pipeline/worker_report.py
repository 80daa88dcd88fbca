"""Workers report themselves to the state store: who they are, their queues, and their model.

An analyze worker's pool process writes its row (``worker_reports``) when it starts ("loading"),
when the warm-up has loaded the model (identity, weights digest, load time) or failed (the reason),
and again every third of ``http.worker_report_max_age_s`` while it lives; a deliver-only worker
writes one without a model. The operations API reads the rows: ``/readyz`` is ready only while some
analyze worker reported a usable model within ``http.worker_report_max_age_s``, ``/api/status`` lists
the workers seen, ``/metrics`` has ``anatomix_model_load_seconds`` per worker. A process that stops
cleanly (worker shutdown, a recycled pool process) removes its row; one that dies leaves it to age out
of ``/readyz`` and be forgotten after :data:`FORGET_AFTER`. The store is where
workers on any host meet the API; a report that cannot be written is logged and tried again at the
next beat, never an error of the worker.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from dicom_node.settings import Settings
from dicom_node.store.base import StoreError, WorkerReport

LOG = logging.getLogger(__name__)

#: Rows of workers not seen for this long are removed when another worker starts (recycled pool processes).
FORGET_AFTER = timedelta(days=1)


def _now() -> datetime:
    return datetime.now(UTC)


class WorkerReporter:
    """One worker process's report, kept fresh by a daemon thread."""

    def __init__(self, settings: Settings, store_of: Any, node_name: str, queues: tuple[str, ...]) -> None:
        self.settings = settings
        self._store_of = store_of  # callable returning this process's store (WorkerContext.store)
        self.node_name = node_name
        self.queues = tuple(queues)
        self._lock = threading.Lock()
        self._report: WorkerReport | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def interval_s(self) -> float:
        return self.settings.http.worker_report_max_age_s / 3

    def start(self, **_: Any) -> None:
        """At the (pool) process start: report "loading" (or, without the analyze queue, no model) and beat."""
        now = _now()
        with self._lock:
            if self._report is None:  # the warm-up may have finished first
                self._report = WorkerReport(
                    name=f"{self.node_name}/{os.getpid()}", hostname=socket.gethostname(), pid=os.getpid(), queues=self.queues,
                    model_ok=False, started_at=now, last_seen_at=now,
                )  # fmt: skip
        self._write(forget_old=True)
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="worker-report", daemon=True)
            self._thread.start()

    def warm_up_done(self, engine: Any, seconds: float, error: str | None = None) -> None:
        """``WorkerContext.on_warm_up``: the model loaded (its identity and load time) or did not (why)."""
        if self._report is None:
            self.start()
        identity = getattr(engine, "identity", None) if engine is not None else None
        with self._lock:
            assert self._report is not None
            self._report = replace(
                self._report, model_ok=engine is not None, load_seconds=round(seconds, 3), error=error,
                model_name=getattr(identity, "name", None), model_version=getattr(identity, "version", None),
                model_digest=getattr(identity, "weights_digest", None), demo_weights=getattr(identity, "demo", None),
                device=getattr(identity, "device", None), last_seen_at=_now(),
            )  # fmt: skip
        self._write()
        if engine is not None:
            LOG.info("model ready in %.1f s (reported as %s)", seconds, self._report.name)

    def stop(self, **_: Any) -> None:
        """At a clean exit of the process: stop beating and remove this worker's row (it is not "seen" any more)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)  # a beat in progress must not write the row back after the removal
        with self._lock:
            report = self._report
        if report is None:
            return
        try:
            self._store_of().remove_worker_report(report.name)
        except StoreError as exc:  # it ages out of /readyz and is forgotten later
            LOG.warning("worker report of %s not removed at shutdown (state store: %s)", report.name, exc)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                if self._report is not None:
                    self._report = replace(self._report, last_seen_at=_now())
            self._write()

    def _write(self, forget_old: bool = False) -> None:
        with self._lock:
            report = self._report
        if report is None:
            return
        try:
            store = self._store_of()
            store.record_worker_report(report)
            if forget_old:
                store.remove_worker_reports(report.last_seen_at - FORGET_AFTER)
        except StoreError as exc:  # the store is down: the next beat writes it
            LOG.warning("worker report not written (state store: %s); trying again in %.0f s", exc, self.interval_s)


def attach_worker_reporter(app: Any, context: Any, node_name: str, queues: tuple[str, ...], analyze: bool) -> WorkerReporter:
    """Wire a reporter into a worker: the pool process reports at its start and after the warm-up
    (analyze workers, ``worker_process_init``); a deliver-only worker reports when it is ready."""
    from celery.signals import worker_process_init, worker_process_shutdown, worker_ready, worker_shutdown

    node = getattr(context, "node", None)  # a worker on another host reports through the node's HTTP service
    reporter = WorkerReporter(context.settings, (lambda: node) if node is not None else context.store, node_name, queues)
    if analyze:
        context.on_warm_up = reporter.warm_up_done
        worker_process_init.connect(reporter.start, weak=False)
        worker_process_shutdown.connect(reporter.stop, weak=False)
    else:
        worker_ready.connect(reporter.start, weak=False)
        worker_shutdown.connect(reporter.stop, weak=False)
    return reporter
