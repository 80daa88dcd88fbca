"""What the node's status shows, shared by ``GET /api/status``, ``/api/model``, ``/readyz`` and the console's
dashboard: the spool disk, the workers seen and the model each loaded, the model the newest analysis
recorded, the TLS certificates in use, and the readiness checks."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from dicom_node.settings import Settings
from dicom_node.store.base import Store, StoreError


def last_model_identity(store: Store) -> dict[str, Any] | None:
    """The model identity the newest analysis recorded (its result's ``model``), with when and which study; None before any."""
    for study in store.list_studies(("analyzed", "delivering", "done"), limit=20):
        for analysis in store.list_analyses(study.study_instance_uid, study.version):
            if analysis.result_json:
                try:
                    model = json.loads(analysis.result_json).get("model")
                except ValueError:
                    continue
                if isinstance(model, dict):
                    return {**model, "seen_at": analysis.created_at.isoformat(), "study_instance_uid": study.study_instance_uid}
    return None


def workers(settings: Settings, store: Store) -> list[dict[str, Any]]:
    """Workers seen (their reports, most recent first; ``live`` within http.worker_report_max_age_s)."""
    now = datetime.now(UTC)
    max_age = settings.http.worker_report_max_age_s
    return [worker_out(r, now, max_age) for r in store.list_worker_reports()]


def certificates(settings: Settings, store: Store) -> list[dict[str, Any]]:
    """The TLS certificates in use (the SCP's, its trusted CAs, each TLS remote node's files): expiry,
    days left and the warning the start-up log gives (expired, within tls.expiry_warning_days, unreadable)."""
    from dicom_node.net.tls import certificate_status

    warn_days = settings.tls.expiry_warning_days
    return [
        {"role": c.role, "path": c.path, "subject": c.subject, "not_after": c.not_after,
         "days_left": None if c.days_left is None else round(c.days_left, 1), "error": c.error, "warning": c.warning(warn_days)}
        for c in certificate_status(settings, store.list_remote_nodes())
    ]  # fmt: skip


def spool_disk(settings: Settings) -> dict[str, Any]:
    """The spool directory's file system: total and free bytes and the configured floor (or the error reading it)."""
    path = settings.storage.spool_dir
    try:
        usage = shutil.disk_usage(path)
    except OSError as exc:
        return {"path": str(path), "error": str(exc)}
    return {"path": str(path), "total_bytes": usage.total, "free_bytes": usage.free, "min_free_bytes": settings.storage.min_free_bytes}


def readiness(settings: Settings, store: Store, celery_app: Callable[[], Any]) -> dict[str, dict[str, Any]]:
    """Each readiness check with ``ok`` and what was found (``celery_app`` gives the Celery application on first use)."""
    checks: dict[str, dict[str, Any]] = {}
    try:
        store.ping()
        checks["store"] = {"ok": True}
    except StoreError as exc:
        checks["store"] = {"ok": False, "detail": str(exc)}
    try:
        with celery_app().connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = {"ok": True}
    except Exception as exc:  # any broker failure means "not ready", with its text
        checks["broker"] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"}
    watermark = settings.http.readiness_min_free_bytes
    watermark = settings.storage.min_free_bytes if watermark < 0 else watermark
    try:
        free = shutil.disk_usage(settings.storage.spool_dir).free
        checks["spool_disk"] = {"ok": free > watermark, "free_bytes": free, "min_free_bytes": watermark}
    except OSError as exc:
        checks["spool_disk"] = {"ok": False, "detail": str(exc)}
    checks["model"] = model_readiness(settings, store)
    return checks


def worker_out(report: Any, now: datetime, max_age_s: float) -> dict[str, Any]:
    """One worker as /api/status shows it; ``model``: loaded, loading, failed, or none (not analysing)."""
    age = (now - report.last_seen_at).total_seconds()
    analyses = "analyze" in report.queues
    model = "loaded" if report.model_ok else "failed" if report.error else "loading" if analyses else "none"
    return {
        "name": report.name, "hostname": report.hostname, "pid": report.pid, "queues": list(report.queues),
        "started_at": report.started_at.isoformat(), "last_seen_at": report.last_seen_at.isoformat(),
        "seen_s_ago": round(age, 1), "live": age <= max_age_s, "model": model, "model_ok": report.model_ok,
        "model_name": report.model_name, "model_version": report.model_version, "model_digest": report.model_digest,
        "demo_weights": report.demo_weights, "device": report.device, "load_seconds": report.load_seconds, "error": report.error,
    }  # fmt: skip


def model_readiness(settings: Settings, store: Store) -> dict[str, Any]:
    """Ready when some live analyze worker (a report within ``http.worker_report_max_age_s``) has loaded
    the model; else why not. Without a configured model nothing is analysed, and that is not a fault."""
    from dicom_node.pipeline.dispatch import model_configured

    if not model_configured(settings):
        return {"ok": True, "detail": "no model configured: studies are received and not analysed"}
    max_age = settings.http.worker_report_max_age_s
    try:
        reports = [r for r in store.list_worker_reports() if "analyze" in r.queues]
    except StoreError as exc:
        return {"ok": False, "detail": f"worker reports unreadable: {exc}"}
    now = datetime.now(UTC)
    live = [r for r in reports if (now - r.last_seen_at).total_seconds() <= max_age]
    usable = [r for r in live if r.model_ok]
    if usable:
        newest = usable[0]
        return {"ok": True, "workers": [r.name for r in usable], "model_name": newest.model_name, "model_version": newest.model_version,
                "model_digest": newest.model_digest, "demo_weights": newest.demo_weights, "load_seconds": newest.load_seconds}  # fmt: skip
    if not live:
        last = f"; the last report came from {reports[0].name} {(now - reports[0].last_seen_at).total_seconds():.0f} s ago" if reports else ""
        detail = f"no analyze worker has reported in the last {max_age:g} s (http.worker_report_max_age_s){last}"
    elif any(r.error for r in live):
        failed = next(r for r in live if r.error)
        detail = f"no live worker has a usable model: {failed.name} could not load it ({failed.error})"
    else:
        detail = f"no live worker has a usable model yet: {', '.join(r.name for r in live)} still loading it"
    return {"ok": False, "detail": detail}
