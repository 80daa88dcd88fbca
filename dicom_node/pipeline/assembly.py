"""Study assembly: when a study is complete (``receiving`` -> ``stable``) and which images to analyse.

A study version is complete when

- no instance arrived for its quiet period (``assembly.quiet_period_s``, overridden per source by
  ``RemoteNode.quiet_period_s``), or
- its source is configured ``complete_on_release`` and released the association that sent it
  (the SCP calls :func:`close_studies_at_release`), or
- it has been receiving for ``assembly.hard_cap_s`` (a sender that never stops).

Closing is a compare-and-set on the study row, so the SCP processes and the assembly loop can race
without double work. Right after closing, selection runs over the version's instances that are
still ``received`` and records ``selected`` or ``skipped`` with the reason. An instance that
arrives later moves the study back to ``receiving`` (or reopens an analysed study as a new
version, see ``Store.record_instance``) and is selected when the study closes again.

:func:`run_assembly` is the loop ``serve`` runs. It hands every ``stable`` study to ``on_stable``
(the pipeline's "queue the analysis" hook). Contract: ``on_stable(study_uid, version)`` moves the
study out of ``stable`` (compare-and-set to ``queued``), otherwise it is offered again at the next
poll, which is also what makes a crash between closing and queueing harmless.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from dicom_node.audit import trail as audit
from dicom_node.audit.trail import AuditTrail
from dicom_node.pipeline.selection import SelectionDecision, select_instance
from dicom_node.settings import Settings
from dicom_node.store.base import RemoteNode, Store, StoreError, StudyRecord

log = logging.getLogger(__name__)

OnStable = Callable[[str, int], None]


def quiet_period_s(settings: Settings, source: RemoteNode | None) -> float:
    if source is not None and source.quiet_period_s is not None:
        return source.quiet_period_s
    return settings.assembly.quiet_period_s


def sources_by_ae_title(store: Store) -> dict[str, RemoteNode]:
    """Configured sources keyed by AE title (the first one wins when several share a title)."""
    sources: dict[str, RemoteNode] = {}
    for node in store.list_remote_nodes():
        if node.is_source:
            sources.setdefault(node.ae_title, node)
    return sources


def close_reason(study: StudyRecord, settings: Settings, source: RemoteNode | None, now: datetime) -> str | None:
    """Why this receiving study is complete now, or None while it is still receiving."""
    quiet = quiet_period_s(settings, source)
    silent_for = (now - study.last_received_at).total_seconds()
    if silent_for >= quiet:
        return f"quiet for {silent_for:.1f} s (quiet period {quiet:g} s)"
    receiving_since = study.state_times.get("receiving", study.created_at)
    receiving_for = (now - receiving_since).total_seconds()
    if receiving_for >= settings.assembly.hard_cap_s:
        return f"receiving for {receiving_for:.0f} s, hard cap {settings.assembly.hard_cap_s:g} s"
    return None


def read_spooled_header(path: Path) -> pydicom.Dataset:
    """The header of a spooled instance (no pixel data read)."""
    return pydicom.dcmread(path, stop_before_pixels=True)


def decide_spooled_instance(path: Path, uid_root: str) -> tuple[str, str]:
    """(instance state, reason) for one spooled file: selected/skipped, or failed if unreadable."""
    try:
        header = read_spooled_header(path)
    except FileNotFoundError:
        return "failed", f"spooled file {path.name} is missing"
    except (InvalidDicomError, ValueError, EOFError, OSError) as exc:
        return "skipped", f"header cannot be read ({type(exc).__name__})"
    decision: SelectionDecision = select_instance(header, uid_root)
    return ("selected" if decision.selected else "skipped"), decision.reason


def select_study_instances(store: Store, settings: Settings, study_instance_uid: str, version: int) -> tuple[int, int]:
    """Record selected/skipped for the version's instances still in ``received``; return (selected, skipped)."""
    selected = skipped = 0
    for instance in store.list_instances(study_instance_uid, version):
        if instance.state != "received" or instance.id is None:
            if instance.state == "selected":
                selected += 1
            continue
        state, reason = decide_spooled_instance(settings.storage.spool_dir / instance.path, settings.output.uid_root)
        store.set_instance_state(instance.id, state, reason)
        if state == "selected":
            selected += 1
        else:
            skipped += 1
            log.info("study %s: instance %s skipped: %s", study_instance_uid, instance.sop_instance_uid, reason)
    return selected, skipped


def close_study(store: Store, settings: Settings, study_instance_uid: str, version: int, why: str, audit_trail: AuditTrail | None = None) -> bool:
    """receiving -> stable (compare-and-set), then selection. False if someone else changed it first."""
    if not store.transition_study(study_instance_uid, version, ("receiving",), "stable"):
        return False
    selected, skipped = select_study_instances(store, settings, study_instance_uid, version)
    log.info("study %s version %d stable (%s): %d selected, %d skipped", study_instance_uid, version, why, selected, skipped)
    if audit_trail is not None:
        audit_trail.record(audit.STUDY_STABLE, None, study_instance_uid=study_instance_uid, version=version, why=why, selected=selected, skipped=skipped)
    return True


def close_stable_studies(store: Store, settings: Settings, now: datetime | None = None, audit_trail: AuditTrail | None = None) -> list[tuple[str, int]]:
    """Close every receiving study whose quiet period or hard cap has passed; return (uid, version) closed."""
    now = now or datetime.now(UTC)
    receiving = store.list_studies(states=("receiving",), limit=100_000)
    if not receiving:
        return []
    sources = sources_by_ae_title(store)
    closed: list[tuple[str, int]] = []
    for study in receiving:
        why = close_reason(study, settings, sources.get(study.source_ae), now)
        if why and close_study(store, settings, study.study_instance_uid, study.version, why, audit_trail):
            closed.append((study.study_instance_uid, study.version))
    return closed


def close_studies_at_release(
    store: Store, settings: Settings, source: RemoteNode, study_uids: set[str], audit_trail: AuditTrail | None = None
) -> list[tuple[str, int]]:
    """The source released its association: its studies (still receiving) are complete."""
    closed: list[tuple[str, int]] = []
    for uid in sorted(study_uids):
        study = store.get_study(uid)
        if study is None or study.state != "receiving":
            continue
        if close_study(store, settings, uid, study.version, f"released by {source.name}", audit_trail):
            closed.append((uid, study.version))
    return closed


def assemble_once(
    store: Store, settings: Settings, on_stable: OnStable | None = None, audit_trail: AuditTrail | None = None, now: datetime | None = None
) -> list[tuple[str, int]]:
    """One pass: close what is complete, finish selection of stable studies, offer them to ``on_stable``."""
    close_stable_studies(store, settings, now, audit_trail)
    if on_stable is None:
        return []
    offered: list[tuple[str, int]] = []
    for study in store.list_studies(states=("stable",), limit=100_000):
        # A study closed at release in an SCP process may still be mid-selection there; finishing
        # the pending ones here, before handing it on, is idempotent (same files, same decisions).
        select_study_instances(store, settings, study.study_instance_uid, study.version)
        on_stable(study.study_instance_uid, study.version)
        offered.append((study.study_instance_uid, study.version))
    return offered


def run_assembly(
    store: Store,
    settings: Settings,
    stop_event: threading.Event,
    on_stable: OnStable | None = None,
    audit_trail: AuditTrail | None = None,
) -> None:
    """Poll until ``stop_event``; store outages are logged and retried at the next poll."""
    log.info(
        "assembly loop: quiet period %g s, hard cap %g s, poll every %g s",
        settings.assembly.quiet_period_s,
        settings.assembly.hard_cap_s,
        settings.assembly.poll_interval_s,
    )
    while not stop_event.is_set():
        try:
            assemble_once(store, settings, on_stable, audit_trail)
        except StoreError as exc:
            log.error("assembly pass failed (retrying in %g s): %s", settings.assembly.poll_interval_s, exc)
        stop_event.wait(settings.assembly.poll_interval_s)
