"""What one delivery attempt yields per instance, whatever the protocol: the outcome taxonomy.

Shared by the C-STORE path (:mod:`dicom_node.pipeline.delivery`) and the STOW-RS path
(:mod:`dicom_node.pipeline.delivery_dicomweb`), so that both map their answers onto one rule set:
``sent``, ``transient`` (retried with backoff, then dead-lettered) or ``permanent`` (recorded as
``failed``; only an admin's resend sends it again).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

Outcome = Literal["sent", "transient", "permanent"]


@dataclass(frozen=True)
class OutgoingObject:
    """One produced result instance waiting to go to a destination."""

    sop_instance_uid: str
    sop_class_uid: str
    kind: str
    path: Path


@dataclass(frozen=True)
class StoreOutcome:
    """What happened to one instance in one delivery attempt."""

    sop_instance_uid: str
    outcome: Outcome
    #: DIMSE status of the C-STORE response, or the FailureReason a STOW-RS answer gave the instance;
    #: None when none came (no association, abort, timeout, an HTTP error without a per-instance reason).
    status: int | None
    error: str | None = None
    #: The SOP class actually sent (differs from the produced one after the 88.34 -> 88.33 fallback).
    sent_sop_class_uid: str | None = None


def classify_status(status: int) -> Outcome:
    """Map a C-STORE response status (or a STOW-RS FailureReason, the same codes) to sent / transient /
    permanent (PS3.4 B.2.3, PS3.7 C, PS3.18 10.5.3).

    Success and warning come from pynetdicom's own categories (every Storage warning means the peer
    stored the object); on top of them our one rule: 0xA7xx (out of resources) may clear later.
    """
    if code_to_category(status) in (STATUS_SUCCESS, STATUS_WARNING):
        return "sent"
    if 0xA700 <= status <= 0xA7FF:  # out of resources: the peer may have room later
        return "transient"
    return "permanent"  # 0xA9xx, 0xCxxx, 0x0122, 0x0211, cancel and anything unknown
