"""Checks of a DICOM audit message against PS3.15 A.5.1 (the schema's required elements and
attributes, their order and value sets) and A.5.3 (what each message type must carry).

No RELAX NG of the DICOM audit message ships in Debian or PyPI, so the schema's rules are written
out here; :func:`audit_message_errors` returns what is wrong (empty = valid).
"""

from __future__ import annotations

import base64
import binascii
import xml.etree.ElementTree as ET
from datetime import datetime

ACTION_CODES = {"C", "R", "U", "D", "E"}
OUTCOMES = {"0", "4", "8", "12"}
#: PS3.16 CID 400 (Audit Event ID) codes.
EVENT_IDS = {"110100", "110101", "110102", "110103", "110104", "110105", "110106", "110107", "110108", "110109",
             "110110", "110111", "110112", "110113", "110114"}  # fmt: skip
ORDER = ["EventIdentification", "ActiveParticipant", "AuditSourceIdentification", "ParticipantObjectIdentification"]


def _coded_errors(element: ET.Element, where: str) -> list[str]:
    errors = [f"{where}: missing @{a}" for a in ("csd-code", "codeSystemName", "originalText") if not element.get(a)]
    unknown = set(element.attrib) - {"csd-code", "codeSystemName", "displayName", "originalText"}
    if unknown:
        errors.append(f"{where}: unknown attribute(s) {sorted(unknown)}")
    return errors


def _codes(parent: ET.Element, tag: str) -> set[str]:
    return {f"{c.get('codeSystemName')}:{c.get('csd-code')}" for c in parent.findall(tag)}


def audit_message_errors(xml: bytes) -> list[str]:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        return [f"not well-formed XML: {exc}"]
    if root.tag != "AuditMessage":
        return [f"root is {root.tag}, not AuditMessage"]
    errors: list[str] = []
    tags = [child.tag for child in root]
    unknown = [t for t in tags if t not in ORDER]
    if unknown:
        errors.append(f"unknown child element(s) {unknown}")
    ranks = [ORDER.index(t) for t in tags if t in ORDER]
    if ranks != sorted(ranks):
        errors.append(f"children out of schema order: {tags}")
    if tags.count("EventIdentification") != 1:
        errors.append("EventIdentification must occur exactly once")
    if tags.count("ActiveParticipant") < 1:
        errors.append("at least one ActiveParticipant is required")
    if tags.count("AuditSourceIdentification") != 1:
        errors.append("AuditSourceIdentification must occur exactly once")
    if errors:
        return errors

    ident = root.find("EventIdentification")
    assert ident is not None
    if ident.get("EventActionCode") not in ACTION_CODES:
        errors.append(f"EventActionCode {ident.get('EventActionCode')!r} not in {sorted(ACTION_CODES)}")
    if ident.get("EventOutcomeIndicator") not in OUTCOMES:
        errors.append(f"EventOutcomeIndicator {ident.get('EventOutcomeIndicator')!r} not in {sorted(OUTCOMES)}")
    try:
        stamp = datetime.fromisoformat(str(ident.get("EventDateTime")).replace("Z", "+00:00"))
        if stamp.tzinfo is None:
            errors.append("EventDateTime has no time zone")
    except ValueError:
        errors.append(f"EventDateTime {ident.get('EventDateTime')!r} is not an xs:dateTime")
    event_ids = ident.findall("EventID")
    if len(event_ids) != 1:
        errors.append("EventID must occur exactly once")
        return errors
    errors += _coded_errors(event_ids[0], "EventID")
    event_id = event_ids[0].get("csd-code")
    if event_ids[0].get("codeSystemName") != "DCM" or event_id not in EVENT_IDS:
        errors.append(f"EventID {event_id} ({event_ids[0].get('codeSystemName')}) is not a DICOM audit event (CID 400)")
    for code in ident.findall("EventTypeCode"):
        errors += _coded_errors(code, "EventTypeCode")

    participants = root.findall("ActiveParticipant")
    roles: set[str] = set()
    for i, p in enumerate(participants):
        if not p.get("UserID"):
            errors.append(f"ActiveParticipant[{i}]: missing @UserID")
        if p.get("UserIsRequestor") not in ("true", "false", "1", "0"):
            errors.append(f"ActiveParticipant[{i}]: @UserIsRequestor {p.get('UserIsRequestor')!r} is not xs:boolean")
        nap = p.get("NetworkAccessPointTypeCode")
        if nap is not None and (nap not in {"1", "2", "3", "4", "5"} or not p.get("NetworkAccessPointID")):
            errors.append(f"ActiveParticipant[{i}]: NetworkAccessPointTypeCode {nap!r} (1-5, with NetworkAccessPointID)")
        for code in p.findall("RoleIDCode"):
            errors += _coded_errors(code, f"ActiveParticipant[{i}]/RoleIDCode")
        roles |= _codes(p, "RoleIDCode")
    source = root.find("AuditSourceIdentification")
    assert source is not None
    if not source.get("AuditSourceID"):
        errors.append("AuditSourceIdentification: missing @AuditSourceID")
    for code in source.findall("AuditSourceTypeCode"):
        errors += _coded_errors(code, "AuditSourceTypeCode")

    object_types: set[str] = set()
    for i, obj in enumerate(root.findall("ParticipantObjectIdentification")):
        where = f"ParticipantObjectIdentification[{i}]"
        if not obj.get("ParticipantObjectID"):
            errors.append(f"{where}: missing @ParticipantObjectID")
        if obj.get("ParticipantObjectTypeCode") not in (None, "1", "2", "3", "4"):
            errors.append(f"{where}: ParticipantObjectTypeCode {obj.get('ParticipantObjectTypeCode')!r}")
        role = obj.get("ParticipantObjectTypeCodeRole")
        if role is not None and not (role.isdigit() and 1 <= int(role) <= 24):
            errors.append(f"{where}: ParticipantObjectTypeCodeRole {role!r} (1-24)")
        id_types = obj.findall("ParticipantObjectIDTypeCode")
        if len(id_types) != 1:
            errors.append(f"{where}: ParticipantObjectIDTypeCode must occur exactly once")
        else:
            errors += _coded_errors(id_types[0], f"{where}/ParticipantObjectIDTypeCode")
            object_types |= _codes(obj, "ParticipantObjectIDTypeCode")
        if obj.find("ParticipantObjectName") is not None and obj.find("ParticipantObjectQuery") is not None:
            errors.append(f"{where}: ParticipantObjectName and ParticipantObjectQuery are a choice")
        for detail in obj.findall("ParticipantObjectDetail"):
            if not detail.get("type") or detail.get("value") is None:
                errors.append(f"{where}/ParticipantObjectDetail: @type and @value are required")
            else:
                try:
                    base64.b64decode(detail.get("value", ""), validate=True)
                except binascii.Error:
                    errors.append(f"{where}/ParticipantObjectDetail: @value is not xs:base64Binary")
        for sop in obj.findall("ParticipantObjectDescription/SOPClass"):
            if not sop.get("UID") or not str(sop.get("NumberOfInstances", "")).isdigit():
                errors.append(f"{where}/SOPClass: @UID and a numeric @NumberOfInstances are required")

    # A.5.3: what each message type must carry.
    types = _codes(ident, "EventTypeCode")
    if event_id in ("110102", "110104") and not {"DCM:110153", "DCM:110152"} <= roles:
        errors.append("instances transfer: needs a Source (110153) and a Destination (110152) participant")
    if event_id in ("110102", "110103", "110104", "110105") and "DCM:110180" not in object_types:
        errors.append("study event: needs a Study Instance UID (110180) participant object")
    if event_id == "110100" and not (types & {"DCM:110120", "DCM:110121"} and "DCM:110150" in roles):
        errors.append("Application Activity: needs EventTypeCode 110120/110121 and an Application (110150) participant")
    if event_id == "110114" and not types & {"DCM:110122", "DCM:110123"}:
        errors.append("User Authentication: needs EventTypeCode Login (110122) or Logout (110123)")
    if event_id == "110113" and not types:
        errors.append("Security Alert: needs an EventTypeCode")
    if event_id == "110101" and "RFC-3881:12" not in object_types:
        errors.append("Audit Log Used: needs the audit log as a participant object (URI, RFC-3881 12)")
    return errors
