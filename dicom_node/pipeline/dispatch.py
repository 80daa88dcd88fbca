"""Dispatch: stable studies onto the ``analyze`` queue, and re-queue what the broker or a worker lost.

The state store is the truth; the broker only carries hints.

1. :func:`queue_study` is assembly's ``on_stable`` hook: ``stable`` -> ``queued`` (compare-and-set)
   and an analyze task, or ``failed`` with "not analysed: no model configured" when the node has no model.

One dispatch loop runs in the node (``serve``); every ``queue.dispatch_interval_s`` it

2. re-sends analyze tasks for ``queued`` studies when the ``analyze`` queue holds fewer messages than
   there are such studies (a broker restarted without persistence, a message taken by a worker that
   died before claiming it); a duplicate is harmless: the task claims the study by compare-and-set;
3. puts ``analyzing`` studies whose worker lease expired back to ``queued`` and re-sends them
   (a worker killed mid-inference);
4. does the same for delivery: ``analyzed`` studies nobody picked up, ``delivering`` studies whose lease
   expired (a deliver worker that died while a retry was pending).

Leases are small JSON files under ``<data_dir>/leases`` renewed by a heartbeat thread in the worker.
Workers on other hosts either share ``data_dir`` (then the node sees their leases; clocks must be in
step, NTP, to within a fraction of ``queue.lease_s``) or reach the node over HTTP, and the node writes
their leases for them on each renewal (:mod:`dicom_node.pipeline.remote_work`; the node's clock only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from celery import Celery
from kombu.exceptions import OperationalError

from dicom_node.pipeline import queue
from dicom_node.settings import Settings
from dicom_node.store.base import Store, StudyRecord

LOG = logging.getLogger(__name__)

NO_MODEL_ERROR = "not analysed: no model configured (set model.dir in the config, or start with --demo-weights)"


# ---- leases --------------------------------------------------------------------------------------


def lease_path(settings: Settings, stage: str, study_instance_uid: str, version: int) -> Path:
    digest = hashlib.sha1(study_instance_uid.encode()).hexdigest()[:20]
    return settings.storage.data_dir / "leases" / f"{stage}-{digest}-v{version}.json"


def write_lease(settings: Settings, stage: str, study_instance_uid: str, version: int, valid_for_s: float, owner: str | None = None) -> None:
    """Claim (or renew the claim on) one unit of work until now + ``valid_for_s``; atomic rename.

    ``owner``: who holds it (default this host and process; the node writes a remote worker's
    lease for it, naming the worker token and the claim)."""
    path = lease_path(settings, stage, study_instance_uid, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = owner or f"{socket.gethostname()}:{os.getpid()}"
    temp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    temp.write_text(json.dumps({"owner": owner, "expires_at": time.time() + valid_for_s, "study": study_instance_uid}))
    os.replace(temp, path)


def lease_expires_at(settings: Settings, stage: str, study_instance_uid: str, version: int) -> float | None:
    """Epoch seconds the lease runs until, None when there is none (or it is unreadable)."""
    try:
        data = json.loads(lease_path(settings, stage, study_instance_uid, version).read_text())
        return float(data["expires_at"])
    except (OSError, ValueError, KeyError):
        return None


def lease_owner(settings: Settings, stage: str, study_instance_uid: str, version: int) -> str | None:
    """Who holds the lease (as written by :func:`write_lease`), None when there is none."""
    try:
        return str(json.loads(lease_path(settings, stage, study_instance_uid, version).read_text())["owner"])
    except (OSError, ValueError, KeyError):
        return None


def lease_is_live(settings: Settings, stage: str, study_instance_uid: str, version: int, now: float | None = None) -> bool:
    expires = lease_expires_at(settings, stage, study_instance_uid, version)
    return expires is not None and expires > (time.time() if now is None else now)


def clear_lease(settings: Settings, stage: str, study_instance_uid: str, version: int) -> None:
    lease_path(settings, stage, study_instance_uid, version).unlink(missing_ok=True)


class Heartbeat:
    """Renews a lease every third of ``queue.lease_s`` while the block runs (a daemon thread)."""

    def __init__(self, settings: Settings, stage: str, study_instance_uid: str, version: int) -> None:
        self.settings, self.stage, self.study, self.version = settings, stage, study_instance_uid, version
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{stage}", daemon=True)

    def _run(self) -> None:
        period = max(0.2, self.settings.queue.lease_s / 3)
        while not self._stop.wait(period):
            write_lease(self.settings, self.stage, self.study, self.version, self.settings.queue.lease_s)

    def __enter__(self) -> Heartbeat:
        write_lease(self.settings, self.stage, self.study, self.version, self.settings.queue.lease_s)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---- the dispatch pass ---------------------------------------------------------------------------


def model_configured(settings: Settings) -> bool:
    return settings.model.dir is not None or settings.model.demo_weights


def seconds_in_state(study: StudyRecord, now: datetime) -> float:
    entered = study.state_times.get(study.state) or study.updated_at
    return (now - entered).total_seconds()


@dataclass
class DispatchReport:
    """What one pass did (for logs and tests)."""

    requeued_analyze: list[str] = field(default_factory=list)
    requeued_deliver: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.requeued_analyze or self.requeued_deliver)


def queue_study(store: Store, app: Celery, settings: Settings, study_instance_uid: str, version: int) -> str:
    """stable -> queued and send the analyze task (or stable -> failed when there is no model).

    This is assembly's ``on_stable`` hook; a crash between the two steps leaves the study ``queued``
    with no message, which :func:`requeue_lost_analyses` repairs.
    """
    if not model_configured(settings):
        if store.transition_study(study_instance_uid, version, ("stable",), "failed", error=NO_MODEL_ERROR):
            LOG.warning("study %s v%d %s", study_instance_uid, version, NO_MODEL_ERROR)
            return "refused"
        return "unchanged"
    if store.transition_study(study_instance_uid, version, ("stable",), "queued"):
        try:
            queue.send_analyze(app, study_instance_uid, version)
        except (OperationalError, OSError) as exc:
            # The broker is down: the study stays queued and the dispatch loop sends it once it is back.
            LOG.error("study %s v%d queued but the broker refused the task (%s); dispatch will re-send it", study_instance_uid, version, exc)
        return "queued"
    return "unchanged"


def requeue_lost_analyses(store: Store, app: Celery, settings: Settings, report: DispatchReport, now: datetime) -> None:
    grace = settings.queue.lease_s
    waiting = [s for s in store.list_studies(states=("queued",)) if seconds_in_state(s, now) > grace]
    if waiting and queue.queue_depth(app, queue.ANALYZE_QUEUE) < len(waiting):
        for study in waiting:
            queue.send_analyze(app, study.study_instance_uid, study.version)
            report.requeued_analyze.append(study.study_instance_uid)
    for study in store.list_studies(states=("analyzing",)):
        uid, version = study.study_instance_uid, study.version
        if seconds_in_state(study, now) <= grace or lease_is_live(settings, "analyze", uid, version):
            continue
        # The worker that claimed it stopped renewing its lease: it died (or hangs past its limit).
        if store.transition_study(uid, version, ("analyzing",), "queued", error="re-queued: the analyze worker stopped"):
            LOG.warning("study %s v%d: analyze worker lease expired, re-queued", uid, version)
            queue.send_analyze(app, uid, version)
            report.requeued_analyze.append(uid)


def requeue_lost_deliveries(store: Store, app: Celery, settings: Settings, report: DispatchReport, now: datetime) -> None:
    grace = settings.queue.lease_s
    waiting = [
        s
        for s in store.list_studies(states=("analyzed",))
        if seconds_in_state(s, now) > grace and not lease_is_live(settings, "deliver", s.study_instance_uid, s.version)
    ]
    if waiting and queue.queue_depth(app, queue.DELIVER_QUEUE) < len(waiting):
        for study in waiting:
            queue.send_deliver(app, study.study_instance_uid, study.version)
            report.requeued_deliver.append(study.study_instance_uid)
    for study in store.list_studies(states=("delivering",)):
        uid, version = study.study_instance_uid, study.version
        if seconds_in_state(study, now) > grace and not lease_is_live(settings, "deliver", uid, version):
            LOG.warning("study %s v%d: delivery lease expired, re-queued", uid, version)
            # A fresh lease stops the next passes from sending it again while it waits in the queue.
            write_lease(settings, "deliver", uid, version, 4 * settings.queue.lease_s)
            queue.send_deliver(app, uid, version)
            report.requeued_deliver.append(uid)


def dispatch_once(store: Store, app: Celery, settings: Settings, now: datetime | None = None) -> DispatchReport:
    """One pass of the loop described in the module docstring."""
    now = now or datetime.now(UTC)
    report = DispatchReport()
    requeue_lost_analyses(store, app, settings, report, now)
    requeue_lost_deliveries(store, app, settings, report, now)
    return report


class Dispatcher:
    """The dispatch loop in a thread. ``wake()`` (usable as assembly's ``on_stable``) runs a pass now."""

    def __init__(self, store_factory: Callable[[], Store], settings: Settings, app: Celery | None = None) -> None:
        self.store_factory, self.settings = store_factory, settings
        self.app = app or queue.create_app(settings)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dispatch", daemon=True)

    def wake(self, *_: object, **__: object) -> None:
        self._wake.set()

    def start(self) -> Dispatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        store = self.store_factory()
        try:
            while not self._stop.is_set():
                try:
                    report = dispatch_once(store, self.app, self.settings)
                    if report:
                        LOG.info("dispatch: %s", report)
                except (OperationalError, OSError) as exc:  # broker or database briefly away: one line, not a traceback
                    LOG.error("dispatch pass failed (%s); retrying in %.1f s", exc, self.settings.queue.dispatch_interval_s)
                except Exception:  # process boundary of the loop: log, keep the node running, try again
                    LOG.exception("dispatch pass failed; retrying in %.1f s", self.settings.queue.dispatch_interval_s)
                self._wake.wait(self.settings.queue.dispatch_interval_s)
                self._wake.clear()
        finally:
            store.close()
