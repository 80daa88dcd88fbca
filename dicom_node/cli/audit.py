"""``anatomix-node audit``: query and export the audit trail (itself an audited act).

Filters: time range (``--since``/``--until``: ISO 8601, or ``30m``/``12h``/``7d`` ago), event
types (``--event``, repeatable or comma-separated), AE title (calling or called), user, study. Prints
a table, or JSON lines (``--jsonl``: one object per event, oldest first, the export format). The
query logic is :func:`query_audit` / :func:`export_audit_jsonl`, which the HTTP API calls too.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import IO, Any

from dicom_node.audit import trail as audit
from dicom_node.ops.errors import UserError
from dicom_node.store.base import AuditEvent, Store

_RELATIVE = re.compile(r"^(\d+)\s*([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
PAGE = 1000


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("audit", help="query or export the audit trail (the export is itself audited)")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="settings file (default: ./anatomix-node.toml, else /etc/anatomix/anatomix-node.toml, if present)")  # fmt: skip
    parser.add_argument("--since", default=None, metavar="WHEN", help="from this time: ISO 8601 (UTC if no zone) or 30m, 12h, 7d ago")
    parser.add_argument("--until", default=None, metavar="WHEN", help="before this time (same forms as --since)")
    parser.add_argument("--event", action="append", default=[], metavar="TYPE",
                        help="only these event types (repeat or comma-separate), e.g. association_rejected,login_failed")  # fmt: skip
    parser.add_argument("--ae", default=None, metavar="AE", help="only events with this calling or called AE title")
    parser.add_argument("--user", default=None, help="only events by this user (admin changes, logins, exports)")
    parser.add_argument("--study", default=None, metavar="UID", help="only events of this Study Instance UID")
    parser.add_argument("--limit", type=int, default=None, help="at most this many events (the oldest that match)")
    parser.add_argument("--jsonl", action="store_true", help="JSON lines, one event per line (the export format)")
    parser.set_defaults(func=run_audit)


def parse_when(text: str | None, now: datetime | None = None) -> datetime | None:
    """ISO 8601 (naive = UTC) or a relative ``N[smhd]`` meaning that long ago."""
    if text is None:
        return None
    match = _RELATIVE.match(text.strip())
    if match:
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UserError(f"{text!r}: give an ISO 8601 time (2026-11-30T08:00:00Z) or an age like 30m, 12h, 7d") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def event_types(values: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v.strip() for value in values for v in value.split(",") if v.strip()))


def query_audit(
    store: Store,
    since: datetime | None = None,
    until: datetime | None = None,
    events: tuple[str, ...] = (),
    ae: str | None = None,
    user: str | None = None,
    study: str | None = None,
    limit: int | None = None,
) -> Iterator[AuditEvent]:
    """Matching events, oldest first, fetched page by page (an export of millions stays in bounded memory)."""
    if since and until and since >= until:
        raise UserError(f"--since {since.isoformat()} is not before --until {until.isoformat()}")
    after, left = 0, limit
    while left is None or left > 0:
        page = store.query_audit_events(since, until, events, ae, user, study, after_id=after,
                                        limit=PAGE if left is None else min(PAGE, left))  # fmt: skip
        yield from page
        if len(page) < PAGE:
            return
        after = int(page[-1].id or 0)
        left = None if left is None else left - len(page)


def event_as_dict(event: AuditEvent) -> dict[str, Any]:
    return {
        "id": event.id, "at": event.at.isoformat(), "event": event.event, "user": event.user,
        "calling_ae": event.calling_ae, "called_ae": event.called_ae, "peer_host": event.peer_host,
        "study_instance_uid": event.study_instance_uid, "sop_instance_uid": event.sop_instance_uid, "detail": event.detail,
    }  # fmt: skip


def export_audit_jsonl(store: Store, settings: Any, out: IO[str], by: str, host: str | None = None, via: str = "cli", **filters: Any) -> int:
    """Write the matching events as JSON lines to ``out``; record the export by ``by`` (ATNA Audit
    Log Used); returns the count. ``filters`` are :func:`query_audit`'s."""
    count = 0
    for event in query_audit(store, **filters):
        out.write(json.dumps(event_as_dict(event), sort_keys=True, ensure_ascii=False) + "\n")
        count += 1
    audit.record_audit_export(store, settings, by, _described(filters), count, host=host, via=via)
    return count


def _described(filters: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else list(v) if isinstance(v, tuple) else v)
            for k, v in filters.items() if v not in (None, (), [])}  # fmt: skip


def _summary(event: AuditEvent) -> str:
    """The table's DETAIL: what changed, or why it failed, first; then the rest of the detail."""
    detail = dict(event.detail)
    lead = [str(detail.pop(key)) for key in ("what", "target", "reason") if detail.get(key) is not None]
    detail.pop("user", None)
    rest = json.dumps(detail, sort_keys=True, default=str) if detail else ""
    return (" ".join(lead) + (": " if lead and rest else "") + rest)[:120]


def run_audit(args: argparse.Namespace) -> int:
    from dicom_node.cli.node import format_table, opened_store
    from dicom_node.ops.studies import acting_user
    from dicom_node.settings import load_settings

    settings = load_settings(args.config)
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: must be >= 1")
    filters = dict(since=parse_when(args.since), until=parse_when(args.until), events=event_types(args.event),
                   ae=args.ae, user=args.user, study=args.study, limit=args.limit)  # fmt: skip
    with opened_store(settings) as store:
        if args.jsonl:
            export_audit_jsonl(store, settings, sys.stdout, acting_user(), **filters)
            return 0
        rows = [("ID", "AT (UTC)", "EVENT", "USER", "AE", "HOST", "STUDY", "DETAIL")]
        for event in query_audit(store, **filters):
            rows.append((str(event.id), event.at.strftime("%Y-%m-%d %H:%M:%S"), event.event, event.user or "",
                         event.calling_ae or event.called_ae or "", event.peer_host or "", event.study_instance_uid or "",
                         _summary(event)))  # fmt: skip
        audit.record_audit_export(store, settings, acting_user(), _described(filters), len(rows) - 1)
    if len(rows) == 1:
        print("no audit event matches")
    else:
        print(format_table(rows))
    return 0
