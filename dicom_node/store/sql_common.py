"""Small helpers of the portable SQL (the store and its mixins): the clock, UTC checks, placeholders."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    return datetime.now(UTC)


def require_aware(name: str, value: datetime) -> datetime:
    """``value`` in UTC; ValueError naming ``name`` when it is naive (the store takes aware UTC times)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} = {value!r}: the store takes timezone-aware UTC times")
    return value.astimezone(UTC)


def placeholders(count: int) -> str:
    """``?, ?, ...``: ``count`` positional parameters."""
    return ", ".join("?" * count)


#: The audit_events columns in the order AuditEvent rows are read (the store and the console's queries).
AUDIT_COLUMNS = "id, at, event, calling_ae, called_ae, peer_host, study_instance_uid, sop_instance_uid, detail, user_name"
