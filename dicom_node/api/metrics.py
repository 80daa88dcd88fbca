"""Prometheus metrics (``anatomix_*``), correct across the node's processes.

Two sources:

* **Counters** of the DICOM side (associations, instances received and rejected, bytes), counted
  where the audit trail already records those events: :func:`count_audit_event` is an audit
  listener (:data:`dicom_node.audit.trail.LISTENERS`), registered by :func:`prepare_multiprocess` in
  ``serve`` before the SCP processes fork. Every process writes its own file in the
  ``prometheus_client`` multiprocess directory (``<data_dir>/metrics``, wiped at each ``serve``
  start); ``/metrics`` sums them. Counters of a process that has ended stay in its file (a counter
  must not go back); only SCP restarts add files, one per new process.
* **Gauges and histograms computed from the state store at scrape** (:class:`StoreCollector`):
  studies by state, result objects by destination and delivery status, queue depths, disk free,
  and stage latencies over the most recent studies (receive->stable, stable->analysed, analysis,
  delivery) plus the engine's own per-task timings from the stored results. Workers may run on
  other hosts and recycle, so the store (which they all write) is the one place that sees all of it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicom_node.settings import Settings
from dicom_node.store.base import NO_DESTINATION, STUDY_STATES, AuditEvent, Store, StoreError
from inference.result import TIMING_COUNTS

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Latency buckets (seconds): from sub-second hand-offs to hour-long retry windows.
BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: Stage histograms look at this many of the newest studies (the computation runs at each scrape).
RECENT_STUDIES = 500
#: Short names for the DIMSE statuses the SCP refuses instances with (the label stays low-cardinality).
REJECT_REASONS = {0xA700: "out_of_resources", 0xA900: "dataset_does_not_match_sop_class", 0xC000: "cannot_understand",
                  0xC211: "processing_failure"}  # fmt: skip

_counters: dict[str, Any] = {}
#: Held while the counters are created: the first audit events of a fresh SCP process arrive on
#: several threads at once, and a second registration of a name raises ``Duplicated timeseries``.
_counters_lock = threading.Lock()


def metrics_dir(settings: Settings) -> Path:
    return settings.storage.data_dir.resolve() / "metrics"


def prepare_multiprocess(settings: Settings) -> Path:
    """In ``serve``, before any child process starts: wipe the metrics directory, point every
    process at it (environment, inherited by forks and subprocesses) and count audit events."""
    from dicom_node.audit import trail as audit

    directory = metrics_dir(settings)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(directory)
    if count_audit_event not in audit.LISTENERS:
        audit.LISTENERS.append(count_audit_event)
    return directory


def _metric(name: str) -> Any:
    """The process's counters, created once on first use (after the environment names the directory)."""
    if not _counters:
        with _counters_lock:
            if not _counters:
                _counters.update(_new_counters())
    return _counters[name]


def _new_counters() -> dict[str, Any]:
    from prometheus_client import Counter

    return dict(
        associations=Counter(
            "anatomix_associations", "DICOM associations by calling AE and outcome (rejected, released, aborted)", ["calling_ae", "outcome"]
        ),  # fmt: skip
        received=Counter("anatomix_instances_received", "Instances stored (acknowledged), by calling AE", ["calling_ae"]),
        duplicates=Counter("anatomix_instances_duplicate", "Exact duplicates acknowledged and not stored again", ["calling_ae"]),
        rejected=Counter("anatomix_instances_rejected", "Instances refused, by calling AE and reason", ["calling_ae", "reason"]),
        bytes=Counter("anatomix_received_bytes", "Bytes of instances received, by calling AE", ["calling_ae"]),
    )


def count_audit_event(row: AuditEvent) -> None:
    """Audit listener: turn the SCP's audit events into counters (never called for other events' cost)."""
    if not os.environ.get(ENV):
        return  # not under serve (a CLI command): nothing would ever read the counters
    ae = row.calling_ae or "(none)"
    detail = row.detail
    if row.event == "association_rejected":
        _metric("associations").labels(ae, "rejected").inc()
    elif row.event in ("association_released", "association_aborted"):
        _metric("associations").labels(ae, row.event.removeprefix("association_")).inc()
        _metric("received").labels(ae).inc(int(detail.get("received", 0)))
        _metric("duplicates").labels(ae).inc(int(detail.get("duplicates", 0)))
        _metric("bytes").labels(ae).inc(int(detail.get("bytes", 0)))
        if detail.get("out_of_resources"):
            _metric("rejected").labels(ae, "out_of_resources").inc(int(detail["out_of_resources"]))
    elif row.event == "stow_request":  # one STOW-RS request: counted as an association's summary is
        if detail.get("refused_request"):
            _metric("rejected").labels(ae, f"stow_http_{int(detail['refused_request'])}").inc()
        _metric("received").labels(ae).inc(int(detail.get("received", 0)))
        _metric("duplicates").labels(ae).inc(int(detail.get("duplicates", 0)))
        _metric("bytes").labels(ae).inc(int(detail.get("bytes", 0)))
        if detail.get("out_of_resources"):
            _metric("rejected").labels(ae, "out_of_resources").inc(int(detail["out_of_resources"]))
    elif row.event == "instance_rejected":
        status = detail.get("status")
        reason = REJECT_REASONS.get(status, f"status_0x{status:04X}") if isinstance(status, int) else "unknown"
        _metric("rejected").labels(ae, reason).inc()


# ---- the optional scrape token --------------------------------------------------------------------


class MetricsTokenUnreadable(RuntimeError):
    """``http.metrics_token_file`` is set but cannot be read, or is empty."""


def metrics_token(settings: Settings) -> str | None:
    """The token /metrics requires (the first line of ``http.metrics_token_file``), or None when unset.

    Read at each scrape: replacing the file rotates the token without a restart.
    """
    if settings.http.metrics_token_file is None:
        return None
    from dicom_node.net.tls import resolve_path

    path = resolve_path(settings, settings.http.metrics_token_file)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeError) as exc:
        raise MetricsTokenUnreadable(f"http.metrics_token_file {path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    if not token:
        raise MetricsTokenUnreadable(f"http.metrics_token_file {path}: is empty")
    return token


def metrics_token_matches(settings: Settings, authorization: str | None) -> bool:
    """True when no token is configured, or the ``Authorization`` header is ``Bearer <the token>``."""
    import hmac

    expected = metrics_token(settings)
    if expected is None:
        return True
    scheme, _, sent = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(sent.strip().encode(), expected.encode())


# ---- at scrape ----------------------------------------------------------------------------------------


def stage_durations(history: Iterable[tuple[str, datetime]], delivered: bool = True) -> dict[str, float]:
    """Stage latencies of one study version from its state history (first entry of each state).

    ``delivery`` is the last delivery pass (its last ``delivering`` to the final state after it: a
    resend's pass replaces an earlier one), and none when ``delivered`` is False (results went to
    no destination: that pass sent nothing and must not pass for a fast delivery).
    """
    entries = sorted(history, key=lambda entry: entry[1])
    first: dict[str, datetime] = {}
    for state, at in entries:
        first.setdefault(state, at)
    spans = {
        "receive_to_stable": ("receiving", "stable"),
        "stable_to_analyzed": ("stable", "analyzed"),
        "analysis": ("analyzing", "analyzed"),
    }
    durations = {
        name: (first[end] - first[start]).total_seconds()
        for name, (start, end) in spans.items()
        if start in first and end in first and first[end] >= first[start]
    }
    starts = [i for i, (state, _) in enumerate(entries) if state == "delivering"]
    if delivered and starts:
        ends = [at for state, at in entries[starts[-1] + 1 :] if state in ("done", "failed")]
        if ends:
            durations["delivery"] = (ends[0] - entries[starts[-1]][1]).total_seconds()
    return durations


class StoreCollector:
    """A ``prometheus_client`` collector reading the state store at each scrape."""

    def __init__(self, settings: Settings, store: Store, queue_depths: Any = None) -> None:
        self.settings = settings
        self.store = store
        self.queue_depths = queue_depths

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("anatomix_store_up", "1 when the state store answered this scrape")
        try:
            by_state_counts = self.store.count_studies_by_state()
            deliveries = self.store.count_current_deliveries()
            studies = self.store.list_studies(limit=RECENT_STUDIES)
        except StoreError as exc:
            log.warning("metrics: state store unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        by_state = GaugeMetricFamily("anatomix_studies", "Studies by current state", labels=["state"])
        for state, count in {**{state: 0 for state in STUDY_STATES}, **by_state_counts}.items():
            by_state.add_metric([state], count)
        yield by_state
        yield from self._destinations()

        per_dest: dict[tuple[str, str], int] = {}
        attempts: dict[str, int] = {}
        for destination, status, count, tries in deliveries:
            per_dest[(destination, status)] = count
            attempts[destination] = attempts.get(destination, 0) + tries
        objects = GaugeMetricFamily("anatomix_deliveries", "Result objects of current study versions by destination and "
                                    "delivery status (pending, sent, retrying, failed, dead)", labels=["destination", "status"])  # fmt: skip
        for (dest, status), count in sorted(per_dest.items()):
            objects.add_metric([dest, status], count)
        yield objects
        attempt_gauge = GaugeMetricFamily("anatomix_delivery_attempts", "C-STORE attempts made for current study versions, by destination",
                                          labels=["destination"])  # fmt: skip
        for dest, count in sorted(attempts.items()):
            attempt_gauge.add_metric([dest], count)
        yield attempt_gauge

        yield from self._stage_histograms(studies)
        yield from self._workers()
        yield from self._certificates()

        disk = GaugeMetricFamily("anatomix_spool_free_bytes", "Free bytes on the spool's file system")
        try:
            disk.add_metric([], shutil.disk_usage(self.settings.storage.spool_dir).free)
            yield disk
        except OSError:
            pass
        if self.queue_depths is not None:
            depth = GaugeMetricFamily("anatomix_queue_depth", "Tasks waiting in each queue", labels=["queue"])
            for name, value in self.queue_depths().items():
                if value is not None:
                    depth.add_metric([name], value)
            yield depth

    def _destinations(self) -> Iterator[Any]:
        """Destination health (issue 21): last success and failure, objects waiting and given up, the
        next try, 1/0 for up; and the done studies whose results went to no destination."""
        from prometheus_client.core import GaugeMetricFamily

        try:
            health = self.store.list_destination_health()
            undelivered = self.store.count_undelivered_studies()
            nodes = [n.name for n in self.store.list_remote_nodes() if n.is_destination]
        except StoreError:
            return
        gauges = {
            "up": GaugeMetricFamily("anatomix_destination_up", "0 while the last delivery attempt to the destination failed, else 1", labels=["destination"]),
            "waiting": GaugeMetricFamily("anatomix_destination_waiting_objects", "Result objects still to send (pending or retrying)", labels=["destination"]),
            "given_up": GaugeMetricFamily("anatomix_destination_given_up_objects", "Result objects dead-lettered or refused for good (dead, failed)",
                                          labels=["destination"]),
            "success": GaugeMetricFamily("anatomix_destination_last_success_timestamp_seconds", "When an attempt last stored objects (Unix time)",
                                         labels=["destination"]),
            "failure": GaugeMetricFamily("anatomix_destination_last_failure_timestamp_seconds", "When an attempt last failed (Unix time)",
                                         labels=["destination"]),
            "next": GaugeMetricFamily("anatomix_destination_next_attempt_timestamp_seconds", "When the next try is due (Unix time)",
                                      labels=["destination"]),
        }  # fmt: skip
        by_name = {h.destination: h for h in health}
        for name in sorted(set(nodes) | set(by_name)):
            h = by_name.get(name)
            gauges["up"].add_metric([name], 0 if h is not None and h.failing else 1)
            gauges["waiting"].add_metric([name], h.waiting if h else 0)
            gauges["given_up"].add_metric([name], h.given_up if h else 0)
            for key, at in (("success", h and h.last_success_at), ("failure", h and h.last_failure_at), ("next", h and h.next_attempt_at)):
                if at:
                    gauges[key].add_metric([name], at.timestamp())
        yield from gauges.values()
        flagged = GaugeMetricFamily("anatomix_studies_undelivered", "Studies done whose results went to no destination (no route, no default)")
        flagged.add_metric([], undelivered)
        yield flagged

    def _workers(self) -> Iterator[Any]:
        """Per live worker (reported within http.worker_report_max_age_s): its model's load time and state."""

        from prometheus_client.core import GaugeMetricFamily

        try:
            reports = self.store.list_worker_reports()
        except StoreError:
            return
        now = datetime.now(UTC)
        live = [r for r in reports if (now - r.last_seen_at).total_seconds() <= self.settings.http.worker_report_max_age_s]
        load = GaugeMetricFamily("anatomix_model_load_seconds", "Seconds the worker's model took to load at warm-up",
                                 labels=["worker", "model_version"])  # fmt: skip
        ok = GaugeMetricFamily("anatomix_worker_model_ok", "1 when the live worker reports a usable model (analyze workers)",
                               labels=["worker"])  # fmt: skip
        for report in live:
            if report.load_seconds is not None and report.model_ok:
                load.add_metric([report.name, report.model_version or ""], report.load_seconds)
            if "analyze" in report.queues:
                ok.add_metric([report.name], 1 if report.model_ok else 0)
        yield load
        yield ok

    def _certificates(self) -> Iterator[Any]:
        """Each TLS certificate in use: its expiry as a Unix time (alert on ``... - time() < 30 * 86400``),
        and 1 for a configured file that cannot be read."""
        from prometheus_client.core import GaugeMetricFamily

        from dicom_node.net.tls import certificate_status

        try:
            statuses = certificate_status(self.settings, self.store.list_remote_nodes())
        except StoreError:
            return
        expiry = GaugeMetricFamily("anatomix_tls_certificate_expiry_timestamp_seconds",
                                   "When each TLS certificate in use expires (Unix time)", labels=["role", "subject"])  # fmt: skip
        unreadable = GaugeMetricFamily("anatomix_tls_certificate_unreadable", "1 for a configured certificate file that cannot be read",
                                       labels=["role", "path"])  # fmt: skip
        for status in statuses:
            if status.error is not None or status.not_after is None:
                unreadable.add_metric([status.role, status.path], 1)
            else:
                expiry.add_metric([status.role, status.subject or ""], datetime.fromisoformat(status.not_after).timestamp())
        yield expiry
        yield unreadable

    def _stage_histograms(self, studies: list[Any]) -> Iterator[Any]:
        from prometheus_client.core import HistogramMetricFamily

        samples: dict[str, list[float]] = {}
        for study in studies:
            delivered = NO_DESTINATION not in (study.error or "") if study.state == "done" else True
            for stage, seconds in stage_durations(study.history or tuple(study.state_times.items()), delivered).items():
                samples.setdefault(stage, []).append(seconds)
        stages = HistogramMetricFamily(
            "anatomix_stage_seconds",
            f"Stage latencies over the newest {RECENT_STUDIES} studies (from their state history)",
            labels=["stage"],
        )
        for stage in ("receive_to_stable", "stable_to_analyzed", "analysis", "delivery"):
            values = samples.get(stage, [])
            stages.add_metric([stage], _buckets(values), sum(values))
        yield stages

        tasks: dict[str, list[float]] = {}
        for study in studies[:50]:
            if study.state not in ("analyzed", "delivering", "done"):
                continue
            try:
                analyses = self.store.list_analyses(study.study_instance_uid, study.version)
            except StoreError:
                break
            for analysis in analyses:
                try:
                    timings = json.loads(analysis.result_json or "{}").get("timings", {})
                except ValueError:
                    continue
                for task, seconds in timings.items():
                    if isinstance(seconds, (int, float)) and task not in TIMING_COUNTS:
                        tasks.setdefault(str(task), []).append(float(seconds))
        engine = HistogramMetricFamily("anatomix_engine_seconds", "Engine time per task/stage of the newest analysed images "
                                       "(the engine's own timings)", labels=["task"])  # fmt: skip
        for task, values in sorted(tasks.items()):
            engine.add_metric([task], _buckets(values), sum(values))
        yield engine


def _buckets(values: list[float]) -> list[tuple[str, float]]:
    out = [(str(float(b)), float(sum(1 for v in values if v <= b))) for b in BUCKETS]
    out.append(("+Inf", float(len(values))))
    return out


def render(settings: Settings, store: Store, queue_depths: Any = None) -> tuple[bytes, str]:
    """The /metrics body: every process's counters (multiprocess files) plus the store's figures."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    if os.environ.get(ENV) and Path(os.environ[ENV]).is_dir():
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    registry.register(StoreCollector(settings, store, queue_depths))
    return generate_latest(registry), CONTENT_TYPE_LATEST
