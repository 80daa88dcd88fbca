"""Retention: remove finished studies after ``storage.retention_days``.

A node that keeps every received image fills its disk, and then refuses every push with 0xA700.
With ``retention_days > 0``, ``serve`` runs a pass every ``RETENTION_INTERVAL_S`` (and
``anatomix-node purge`` runs one on demand). A study in one of ``retention_states`` (``done`` by
default) whose last change is older than the cutoff loses its spooled instances, result objects,
analyses and deliveries; its row stays as a ``purged`` tombstone (with its state history), and the
audit trail records ``study_purged``.

Nothing acknowledged is lost: the store removes the rows and calls back here to delete the files
while it holds the study's lock (see :meth:`dicom_node.store.base.Store.purge_study`). An instance
arriving for the study meanwhile is recorded only after that commit, and then reopens the study as
a new version; the SCP re-writes its file if a purge removed it in between (see
:func:`dicom_node.store.spool.ensure_spooled`).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from dicom_node.audit import trail as audit
from dicom_node.audit.trail import AuditTrail
from dicom_node.settings import Settings
from dicom_node.store.base import PurgedStudy, Store, StoreError

log = logging.getLogger(__name__)

#: Seconds between retention passes in ``serve``.
RETENTION_INTERVAL_S = 3600.0


@dataclass
class PurgeReport:
    cutoff: datetime
    candidates: list[str] = field(default_factory=list)
    purged: list[PurgedStudy] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.purged)


def _remover(settings: Settings, study_instance_uid: str):
    spool_dir = settings.storage.spool_dir
    results_dir = settings.storage.results_dir

    def remove(instance_paths: list[str], produced_paths: list[str]) -> None:
        for relative in instance_paths:
            (spool_dir / relative).unlink(missing_ok=True)
        for relative in produced_paths:
            (results_dir / relative).unlink(missing_ok=True)
        study_spool = spool_dir / study_instance_uid
        try:
            study_spool.rmdir()  # only when empty: a file being received right now stays
        except OSError:
            pass
        study_results = results_dir / study_instance_uid
        if study_results.is_dir():
            shutil.rmtree(study_results, ignore_errors=True)

    return remove


def purge_expired(
    settings: Settings,
    store: Store,
    trail: AuditTrail | None = None,
    days: float | None = None,
    now: datetime | None = None,
    dry_run: bool = False,
    limit: int = 500,
) -> PurgeReport:
    """One retention pass: purge up to ``limit`` expired studies (or only list them, ``dry_run``)."""
    started = time.monotonic()
    days = settings.storage.retention_days if days is None else days
    if days < 0:
        raise ValueError(f"retention of {days} days: must be >= 0")
    cutoff = (now or datetime.now(UTC)) - timedelta(days=days)
    states = tuple(settings.storage.retention_states)
    report = PurgeReport(cutoff=cutoff, candidates=store.list_purge_candidates(states, cutoff, limit=limit))
    if dry_run:
        report.seconds = time.monotonic() - started
        return report
    for uid in report.candidates:
        purged = store.purge_study(uid, states, cutoff, _remover(settings, uid))
        if purged is None:  # changed since it was listed (a late instance reopened it): keep it
            continue
        report.purged.append(purged)
        if trail is not None:
            trail.record(
                audit.STUDY_PURGED,
                None,
                study_instance_uid=uid,
                version=purged.version,
                instances=purged.instances,
                produced_objects=purged.produced_objects,
                bytes=purged.bytes,
                retention_days=days,
            )
    report.seconds = time.monotonic() - started
    if report.purged:
        log.info(
            "retention: purged %d studies older than %g days (%d instances, %.1f MB) in %.2f s",
            len(report.purged),
            days,
            sum(p.instances for p in report.purged),
            report.bytes / 1e6,
            report.seconds,
        )
    return report


def run_retention(settings: Settings, store: Store, trail: AuditTrail, stop_event: threading.Event) -> None:
    """``serve``'s retention loop (only started when ``storage.retention_days > 0``)."""
    log.info(
        "retention: studies %s for more than %g days are purged, checked every %g s",
        " or ".join(settings.storage.retention_states),
        settings.storage.retention_days,
        RETENTION_INTERVAL_S,
    )
    while not stop_event.is_set():
        try:
            purge_expired(settings, store, trail)
        except (StoreError, OSError) as exc:
            log.error("retention pass failed (retrying in %g s): %s", RETENTION_INTERVAL_S, exc)
        stop_event.wait(RETENTION_INTERVAL_S)
