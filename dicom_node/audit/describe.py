"""Audit events in words: one sentence a person can read per event, and its details as short
labelled values (long lists counted, never inlined). Used by the console's audit page.

Pure functions of an :class:`~dicom_node.store.base.AuditEvent`; an event this module does not
know still reads as its name with who and where.
"""

from __future__ import annotations

import json
from typing import Any

from dicom_node.store.base import AuditEvent

#: Labels of the audit trail's event names (the filter's choices, in a sensible order).
EVENT_LABELS: dict[str, str] = {
    "association_accepted": "association accepted",
    "association_released": "association released",
    "association_aborted": "association aborted",
    "association_rejected": "association rejected",
    "association_rejected_summary": "associations rejected (summary)",
    "connections_summary": "connections refused (summary)",
    "stow_request": "STOW-RS request",
    "instance_rejected": "instance refused",
    "instance_new_version": "instance received again, changed",
    "instance_flagged": "instance flagged",
    "instance_recovered": "instance recovered",
    "study_stable": "study complete",
    "study_analysed": "study analysed",
    "objects_send_started": "sending started",
    "objects_sent": "objects sent",
    "study_resent": "results resent",
    "study_reanalysis_requested": "reanalysis requested",
    "study_purged": "study purged",
    "routing_rule_changed": "routing rule changed",
    "admin_change": "configuration change (CLI)",
    "api_change": "change by an account",
    "login": "login",
    "login_failed": "login failed",
    "logout": "logout",
    "api_login": "console/API login",
    "api_login_failed": "console/API login failed",
    "api_login_rate_limited": "console/API login rate-limited",
    "audit_exported": "audit trail exported",
    "application_started": "node started",
    "application_stopped": "node stopped",
}

#: Events that say something went wrong (the page marks them).
PROBLEM_EVENTS = frozenset(
    {"association_rejected", "association_rejected_summary", "connections_summary", "association_aborted", "instance_rejected",
     "instance_flagged", "login_failed", "api_login_failed", "api_login_rate_limited"}
)  # fmt: skip

#: A value longer than this is shown as its size, with the text on demand.
_LONG = 160


def _n(count: Any, one: str, many: str | None = None) -> str:
    try:
        n = int(count)
    except (TypeError, ValueError):
        n = 0
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _peer(event: AuditEvent) -> str:
    who = event.calling_ae or "?"
    return f"{who}@{event.peer_host}" if event.peer_host else who


def _version(d: dict[str, Any]) -> str:
    return f" v{d['version']}" if d.get("version") not in (None, 1) else ""


def sentence(event: AuditEvent) -> str:
    """One sentence for ``event`` (no UIDs: the page shows the study beside it)."""
    d = event.detail or {}
    name = event.event
    user = event.user or d.get("user")
    by = f" by {user}" if user else ""
    via = f" ({d['via']})" if d.get("via") else ""
    reason = f": {d['reason']}" if d.get("reason") else ""
    if name == "association_accepted":
        return f"{_peer(event)} connected to {event.called_ae or 'the node'}" + (f" (source {d['source']})" if d.get("source") else " (unknown source)") + "."
    if name in ("association_released", "association_aborted"):
        done = "finished" if name == "association_released" else "was aborted"
        parts = [_n(d.get("received", 0), "image")]
        for key, label in (("duplicates", "duplicate"), ("new_versions", "new version"), ("refused", "refused")):
            if d.get(key):
                parts.append(f"{d[key]} {label}")
        studies = d.get("studies") if isinstance(d.get("studies"), list) else []
        return (
            f"Association from {_peer(event)} {done}{reason}: {', '.join(parts)} received"
            + (f" in {_n(len(studies), 'study', 'studies')}" if studies else "")
            + "."
        )
    if name == "stow_request":
        source = f" (source {d['source']})" if d.get("source") else ""
        if d.get("refused_request"):
            return f"STOW-RS request from {_peer(event)}{source} refused with HTTP {d['refused_request']}{reason}."
        parts = [_n(d.get("received", 0), "image")]
        for key, label in (("duplicates", "duplicate"), ("refused", "refused"), ("out_of_resources", "out of resources")):
            if d.get(key):
                parts.append(f"{d[key]} {label}")
        return f"STOW-RS request from {_peer(event)}{source}: {', '.join(parts)}."
    if name == "association_rejected":
        return f"Association from {_peer(event)} to {event.called_ae or '?'} refused{reason}."
    if name == "association_rejected_summary":
        return f"{_n(d.get('count'), 'further association')} from {event.peer_host or '?'} refused in {d.get('window_s', '?')} s" + (
            f" (calling AE titles {', '.join(map(str, d['calling_aes']))})" if d.get("calling_aes") else "") + "."  # fmt: skip
    if name == "connections_summary":
        return f"{_n(d.get('count'), 'connection')} from {event.peer_host or '?'} {str(d.get('kind', '')).replace('_', ' ')} in {d.get('window_s', '?')} s."
    if name == "instance_rejected":
        return f"An image from {_peer(event)} was refused{reason}."
    if name == "instance_new_version":
        return f"An image from {_peer(event)} came again with different content: kept as a new version."
    if name == "instance_flagged":
        return f"An image from {_peer(event)} was stored but cannot be analysed{reason}."
    if name == "instance_recovered":
        return "An image found in the spool without a record was recovered."
    if name == "study_stable":
        return f"Study{_version(d)} complete ({d.get('why', 'quiet')}): {_n(d.get('selected', 0), 'image')} to analyse, {d.get('skipped', 0)} skipped."
    if name == "study_analysed":
        return f"Study{_version(d)} analysed: {d.get('outcome', '?')}" + (f" ({d['summary']})" if d.get("summary") else "") + "."
    if name == "objects_send_started":
        classes: Any = d.get("sop_classes") if isinstance(d.get("sop_classes"), dict) else {}
        return f"Sending {_n(len(classes), 'result object')} of the study{_version(d)} to {d.get('destination', '?')} ({_peer(event)})."
    if name == "objects_sent":
        sent: Any = d.get("sent") if isinstance(d.get("sent"), list) else []
        failed: Any = d.get("failed") if isinstance(d.get("failed"), dict) else {}
        text = f"{_n(len(sent), 'result object')} of the study{_version(d)} sent to {d.get('destination', '?')}"
        if failed:
            first = next(iter(failed.values()))
            text += f"; {len(failed)} not sent ({first})"
        return text + "."
    if name == "study_resent":
        dests = ", ".join(map(str, d.get("destinations") or [])) or "its destinations"
        return f"Results resent to {dests}{by}{via}: {d.get('sent', 0)} sent, {d.get('failed', 0)} failed, {d.get('retrying', 0)} to retry."
    if name == "study_reanalysis_requested":
        return f"Reanalysis requested{by}{via}: queued as v{d.get('version', '?')}" + (" (a new version)" if d.get("new_version") else "") + "."
    if name == "study_purged":
        removed = f"{_n(d.get('instances', 0), 'image')}, {_n(d.get('produced_objects', 0), 'result object')}"
        return f"Study{_version(d)} purged after {d.get('retention_days', '?')} days: {removed}."
    if name == "routing_rule_changed":
        return f"Routing rule {d.get('rule', '?')}: {d.get('change', 'changed')}{by}."
    if name == "admin_change":
        what = str(d.get("what", "settings"))
        return f"{_ADMIN_WHAT.get(what, what)} {d.get('target', '')}{by}{via}.".replace(" .", ".")
    if name == "api_change":
        action = str(d.get("action", "change"))
        extra = " (password reset)" if d.get("password_reset") else ""
        return f"{_API_ACTIONS.get(action, action.replace('_', ' '))} {d.get('target', '')}{extra}{by}{via}.".replace(" .", ".")
    if name in ("login", "api_login"):
        return f"{user or '?'} logged in" + (f" as {d['role']}" if d.get("role") else "") + (f" from {event.peer_host}" if event.peer_host else "") + "."
    if name in ("login_failed", "api_login_failed"):
        return f"Failed login as {user or '?'}" + (f" from {event.peer_host}" if event.peer_host else "") + f"{reason}."
    if name == "api_login_rate_limited":
        return f"Login as {user or '?'}" + (f" from {event.peer_host}" if event.peer_host else "") + " refused: too many failed logins."
    if name in ("logout", "api_logout"):
        return f"{user or '?'} logged out."
    if name == "audit_exported":
        count = d.get("count", d.get("events"))
        return f"Audit trail exported{by}{via}: {_n(count, 'event')}."
    if name == "application_started":
        return f"The node started as {d.get('ae_title', '?')} on port {d.get('port', '?')}."
    if name == "application_stopped":
        return f"The node {d.get('ae_title', '')} stopped.".replace("  ", " ")
    return f"{name.replace('_', ' ').capitalize()}{by}" + (f" ({_peer(event)})" if event.calling_ae or event.peer_host else "") + "."


_ADMIN_WHAT = {
    "settings.init": "Settings file written",
    "remote_node.add": "Remote node added:",
    "remote_node.update": "Remote node changed:",
    "remote_node.remove": "Remote node removed:",
}
_API_ACTIONS = {
    "node_added": "Remote node added:",
    "node_updated": "Remote node changed:",
    "node_removed": "Remote node removed:",
    "user_added": "Account added:",
    "user_updated": "Account changed:",
    "user_removed": "Account removed:",
    "password_changed": "Password changed for",
    "token_created": "API token created for",
    "token_revoked": "API token revoked of",
    "study_resend": "Resend of a study",
    "study_reanalyze": "Reanalysis of a study",
    "bulk_resend": "Resend of",
    "bulk_reanalyze": "Reanalysis of",
}


def details(event: AuditEvent) -> list[tuple[str, str]]:
    """(label, value) pairs of the event's detail for on-demand display: lists of UIDs counted with
    their values listed one per line, nested values as compact JSON; a field that is long says its size."""
    out: list[tuple[str, str]] = []
    for key, value in (event.detail or {}).items():
        if key == "user" or value in (None, "", [], {}):
            continue
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            out.append((f"{key} ({len(value)})", "\n".join(value)))
        elif isinstance(value, dict) and "sha256" in value:  # a file's digest (settings.init)
            out.append((key, f"sha256 {str(value['sha256'])[:16]}…, {value.get('bytes', '?')} bytes, {value.get('lines', '?')} lines"))
        elif isinstance(value, dict) and key in ("failed", "sop_classes"):
            out.append((f"{key} ({len(value)})", "\n".join(f"{k}: {v}" for k, v in value.items())))
        elif isinstance(value, (dict, list)):
            out.append((key, json.dumps(value, sort_keys=True, indent=1, default=str)))
        else:
            text = str(value)
            out.append((key if len(text) <= _LONG else f"{key} ({len(text)} characters)", text))
    for label, value in (("SOP Instance UID", event.sop_instance_uid), ("Study Instance UID", event.study_instance_uid)):
        if value:
            out.append((label, value))
    return out
