"""Studies: the JSON-ready summary the CLI, the API and the console show, the selection of studies
for bulk actions, and the two actions on a study's results: resend and reanalyse.

The actions record their own audit event (who, from where, via which front end) and return an
:class:`ActionResult`; a refusal the user can act on is a UserError (resend) or a result with
``ok=False`` (reanalyse, so that a bulk run goes on with the next study).
"""

from __future__ import annotations

import getpass
import os
import socket
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from dicom_node.audit.trail import AuditTrail, Peer
from dicom_node.ops.errors import UserError
from dicom_node.settings import Settings
from dicom_node.store.base import FINAL_STUDY_STATES, NO_DESTINATION, InstanceRecord, RemoteNode, Store, StudyRecord

#: The analysis found no image to analyse (a CT, a lateral): a normal outcome, recorded in the error column.
NOTHING_TO_ANALYSE = "nothing to analyse"
#: Header fields shown per study, read from one of its spooled instances (the store keeps UIDs only).
STUDY_HEADER_FIELDS = {
    "patient_id": "PatientID", "accession_number": "AccessionNumber",
    "study_date": "StudyDate", "study_description": "StudyDescription",
}  # fmt: skip
#: The states from which a study's results may be sent again, or the study analysed again (by state
#: selection in bulk): it has finished, well or not, and still has its files (not purged).
ACTIONABLE_STATES = ("done", "failed")
#: A study can be resent also while its first delivery is under way.
RESENDABLE_STATES = (*ACTIONABLE_STATES, "analyzed", "delivering")

#: Audit events of the admin commands.
RESEND_EVENT = "study_resent"
REANALYZE_EVENT = "study_reanalysis_requested"


def study_outcome(study: StudyRecord) -> str:
    """``skipped`` for a study finished with nothing to analyse, ``undelivered`` for one finished
    whose results went to no destination at all, else its state."""
    if study.state == "done" and (study.error or "").startswith(NOTHING_TO_ANALYSE):
        return "skipped"
    if study.state == "done" and NO_DESTINATION in (study.error or ""):
        return "undelivered"
    return study.state


def read_study_header(spool_dir: Path, instances: list[InstanceRecord]) -> dict[str, str]:
    """Patient ID, accession, date and description from the first readable spooled instance (header only)."""
    import pydicom

    for instance in instances:
        try:
            ds = pydicom.dcmread(spool_dir / instance.path, stop_before_pixels=True, specific_tags=list(STUDY_HEADER_FIELDS.values()))
        except Exception:  # a purged or unreadable file: try the next one, else show blanks
            continue
        return {key: str(ds.get(keyword, "") or "").strip() for key, keyword in STUDY_HEADER_FIELDS.items()}
    return dict.fromkeys(STUDY_HEADER_FIELDS, "")


def study_summary(study: StudyRecord, store: Store, now: datetime, spool_dir: Path | None = None, sources: dict[str, str] | None = None) -> dict[str, Any]:
    """A JSON-ready view of one study: counts of its current version, skip reasons, stage times."""
    instances = store.list_instances(study.study_instance_uid, version=study.version)
    outcome = study_outcome(study)
    stages = stage_durations(study.history or study.state_times, study.state, now)
    if outcome == "skipped":  # nothing was analysed: no "analyzing 0.0s" stage
        stages = [stage for stage in stages if stage["state"] != "analyzing"]
    header = read_study_header(spool_dir, instances) if spool_dir is not None else dict.fromkeys(STUDY_HEADER_FIELDS, "")
    return {
        "study_instance_uid": study.study_instance_uid,
        "state": study.state,
        "outcome": outcome,
        "version": study.version,
        "source_ae": study.source_ae,
        "source": (sources or {}).get(study.source_ae, study.source_ae),
        **header,
        "instance_count": study.instance_count,
        "version_instance_count": len(instances),
        "instance_states": dict(Counter(i.state for i in instances)),
        "skip_reasons": dict(Counter(i.reason or "(no reason recorded)" for i in instances if i.state == "skipped").most_common()),
        "error": None if outcome == "skipped" else study.error,
        "created_at": study.created_at.isoformat(),
        "last_received_at": study.last_received_at.isoformat(),
        "updated_at": study.updated_at.isoformat(),
        "state_times": {state: at.isoformat() for state, at in study.state_times.items()},
        # Every state entered, in order (a resend adds its own entries, the first delivery's stay).
        "history": [{"state": state, "entered_at": at.isoformat()} for state, at in study.history],
        "stages": stages,
    }


def delivery_summary(store: Store, settings: Any, study: StudyRecord) -> list[dict[str, Any]]:
    """Each destination of the study's current version: counts, attempts, next try (JSON-ready)."""
    from dicom_node.pipeline.delivery import destination_states

    return [
        {"name": d.name, "total": d.total, "sent": d.sent, "retrying": d.retrying, "failed": d.failed, "dead": d.dead,
         "attempts": d.attempts, "next_attempt_at": d.next_attempt_at.isoformat() if d.next_attempt_at else None,
         "text": d.describe()}
        for d in destination_states(store, settings, study)
    ]  # fmt: skip


def stage_durations(state_times: dict[str, datetime] | tuple[tuple[str, datetime], ...], current: str, now: datetime) -> list[dict[str, Any]]:
    """Each state entered, in order, with how long it lasted (the current one: until now;
    a final state, done, failed or purged: None). Takes the study's full history or its state -> time map."""
    entries = state_times.items() if isinstance(state_times, dict) else state_times
    ordered = sorted(entries, key=lambda item: item[1])
    stages = []
    for index, (state, entered) in enumerate(ordered):
        if index + 1 < len(ordered):
            seconds: float | None = (ordered[index + 1][1] - entered).total_seconds()
        elif state == current and state not in FINAL_STUDY_STATES:
            seconds = (now - entered).total_seconds()
        else:
            seconds = None
        stages.append({"state": state, "entered_at": entered.isoformat(), "seconds": seconds})
    return stages


def select_studies(store: Store, uid: str | None, states: list[str] | None, since: datetime | None,
                   undelivered: bool = False, labels: Mapping[str, str] | None = None) -> list[StudyRecord]:  # fmt: skip
    """The study named, or every study matching the bulk options (oldest change first). UserError
    names the options by ``labels`` (the field names ``states``, ``since``... when not given)."""
    label = {"uid": "study_instance_uid", "states": "states", "since": "since", "undelivered": "undelivered", **(labels or {})}
    if uid is not None:
        if states or since or undelivered:
            raise UserError(f"give either {label['uid']} or the bulk options ({label['states']}, {label['since']}, "
                            f"{label['undelivered']}), not both")  # fmt: skip
        study = store.get_study(uid)
        if study is None:
            raise UserError(f"no study {uid} in the state store (see `anatomix-node studies`)")
        return [study]
    if not states and not undelivered:
        raise UserError(f"name a {label['uid']}, or select studies with {label['states']} (and {label['since']})")
    chosen: dict[str, StudyRecord] = {}
    if states:
        for study in store.list_studies(states=tuple(states), limit=1_000_000):
            chosen[study.study_instance_uid] = study
    if undelivered:
        for record in store.list_deliveries(statuses=("failed", "dead")):
            study = chosen.get(record.study_instance_uid) or store.get_study(record.study_instance_uid)
            if study is not None and study.version == record.study_version and study.state in ACTIONABLE_STATES:
                chosen[study.study_instance_uid] = study
        for study in store.list_studies(states=("done",), limit=1_000_000):  # results that went to no destination at all
            if study_outcome(study) == "undelivered":
                chosen[study.study_instance_uid] = study
    studies = [s for s in chosen.values() if since is None or s.updated_at >= since]
    return sorted(studies, key=lambda s: s.updated_at)


def acting_user() -> str:
    """Who runs an admin command on this machine (the uid when the account has no name, e.g. in a container)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


@dataclass(frozen=True)
class ActionResult:
    """What a resend or reanalysis of one study did: ``lines`` are its per-destination outcomes."""

    study_instance_uid: str
    ok: bool
    message: str
    version: int | None = None
    lines: tuple[str, ...] = ()


def _record(trail: AuditTrail, event: str, study: StudyRecord, user: str, via: str, **detail: Any) -> None:
    trail.record(event, Peer(None, None, socket.gethostname()), study_instance_uid=study.study_instance_uid, user=user, via=via, **detail)


def resend_study(
    store: Store,
    settings: Settings,
    app: object,
    trail: AuditTrail,
    study: StudyRecord,
    target: RemoteNode | None,
    *,
    bulk: bool,
    user: str,
    via: str,
) -> ActionResult:
    """Send one study's current results again (to ``target``, or to its routed destinations).
    ``ok`` is False when a destination ended without everything; what is left is retried by the
    deliver workers. Raises UserError when the study has nothing to send or nowhere to send it."""
    from dicom_node.pipeline.delivery import deliver_study_version, route_destinations
    from dicom_node.pipeline.queue import send_deliver
    from dicom_node.pipeline.tasks import finish_delivery
    from sr_writer.bundle import comprehensive_sr_fallback

    uid = study.study_instance_uid
    if study.state == "purged":
        raise UserError(f"study {uid} was purged by the retention policy: its results are gone")
    if study.state not in RESENDABLE_STATES:
        raise UserError(f"study {uid} is {study.state}: it has no results to send yet")
    if not store.list_produced_objects(uid, study.version):
        raise UserError(f"study {uid} v{study.version} has no results to send (state {study.state}); "
                       "`anatomix-node reanalyze` analyses it again")  # fmt: skip
    targets = [target] if target is not None else route_destinations(store, study, settings)
    if not targets:
        raise UserError(f"study {uid} has no destinations: name one")
    # Appends delivering (and later done/failed) to the history; the first delivery's entries stay.
    store.transition_study(uid, study.version, (*ACTIONABLE_STATES, "analyzed"), "delivering", error=study.error)
    current = store.get_study(uid)
    assert current is not None
    study = current
    summary = deliver_study_version(store, settings, study, fallback=comprehensive_sr_fallback, destinations=targets, resend=True)
    _record(trail, RESEND_EVENT, study, user, via, version=study.version, destinations=[t.name for t in targets], sent=summary.sent,
            retrying=summary.retrying, failed=summary.failed, dead=summary.dead, bulk=bulk)  # fmt: skip
    lines = [state.describe() for state in summary.destinations]
    if not summary.finished:
        send_deliver(app, uid, study.version, countdown=summary.next_attempt_in)
        lines.append(f"{summary.retrying} instance(s) will be retried by the deliver workers")
        return ActionResult(uid, True, "; ".join(lines), study.version, tuple(lines))
    final = finish_delivery(store, study, summary)
    ok = final == "done" and not summary.errors
    return ActionResult(uid, ok, "; ".join(lines) or "sent", study.version, tuple(lines))


def reanalyze_study(store: Store, app: object, trail: AuditTrail, study: StudyRecord, *, new_version: bool, user: str, via: str) -> ActionResult:
    """Queue a done or failed study for analysis again; with results already made, only as a new
    version (new result UIDs) when ``new_version``. ``ok=False`` with the reason when refused."""
    from dicom_node.pipeline.queue import send_analyze

    uid = study.study_instance_uid
    has_results = bool(store.list_produced_objects(uid, study.version))
    if study.state not in ACTIONABLE_STATES:
        return ActionResult(uid, False, f"study {uid} is {study.state}: only done or failed studies are analysed again")
    if has_results and not new_version:
        return ActionResult(uid, False, f"study {uid} v{study.version} already has results: analyse it again as a new version "
                                        "(new result UIDs) with --new-version (API: new_version)")  # fmt: skip
    version = store.requeue_for_analysis(uid, study.version, ACTIONABLE_STATES, new_version=has_results)
    if version is None:
        now = store.get_study(uid)
        return ActionResult(uid, False, f"study {uid} changed meanwhile (now {now.state if now else 'gone'})")
    _record(trail, REANALYZE_EVENT, study, user, via, previous_state=study.state, previous_version=study.version, version=version,
            new_version=version != study.version)  # fmt: skip
    send_analyze(app, uid, version)
    return ActionResult(uid, True, f"queued for analysis as v{version}" + (" (new version)" if version != study.version else ""), version)
