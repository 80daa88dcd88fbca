"""Audit trail rows as DICOM audit messages (PS3.15 A.5) in RFC 5424 syslog frames.

:func:`audit_message` turns one :class:`~dicom_node.store.base.AuditEvent` into the XML of one
``AuditMessage`` (EventIdentification, ActiveParticipant, AuditSourceIdentification,
ParticipantObjectIdentification), with the DCM codes of PS3.16 (EventID, EventTypeCode,
RoleIDCode, ParticipantObjectIDTypeCode) and the RFC 3881 codes where DICOM uses them.
:func:`syslog_frame` wraps it in one RFC 5424 message (facility authpriv, severity notice or
warning; MSGID ``IHE+RFC-3881``; the event id in structured data as the de-duplication key) with
RFC 6587 octet counting, the framing RFC 5425 (TLS) uses too.

The XML is the one place besides the audit table where patient identifiers appear (the ATNA
repository is where they belong); :class:`PatientLookup` reads them from the spooled study.
"""

from __future__ import annotations

import base64
import json
import socket
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicom_node.store.base import AuditEvent

#: RFC 5424 MSGID of IHE ATNA messages (ITI TF-2a 3.20.6) and our SD-ID (the documentation PEN of RFC 5612).
MSGID = "IHE+RFC-3881"
SD_ID = "anatomix@32473"
FACILITY_AUTHPRIV = 10
SEVERITY_WARNING, SEVERITY_NOTICE = 4, 5

# ---- codes (PS3.16 CID 400-405, RFC 3881) ------------------------------------------------------------
Code = tuple[str, str, str]  # (code, code system name, display name)


def dcm(code: str, name: str) -> Code:
    return (code, "DCM", name)


def rfc3881(code: str, name: str) -> Code:
    return (code, "RFC-3881", name)


APPLICATION_ACTIVITY = dcm("110100", "Application Activity")
AUDIT_LOG_USED = dcm("110101", "Audit Log Used")
BEGIN_TRANSFERRING = dcm("110102", "Begin Transferring DICOM Instances")
INSTANCES_ACCESSED = dcm("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = dcm("110104", "DICOM Instances Transferred")
STUDY_DELETED = dcm("110105", "DICOM Study Deleted")
SECURITY_ALERT = dcm("110113", "Security Alert")
USER_AUTHENTICATION = dcm("110114", "User Authentication")

APPLICATION_START = dcm("110120", "Application Start")
APPLICATION_STOP = dcm("110121", "Application Stop")
LOGIN = dcm("110122", "Login")
LOGOUT = dcm("110123", "Logout")
NODE_AUTHENTICATION = dcm("110126", "Node Authentication")
NETWORK_CONFIGURATION = dcm("110128", "Network Configuration")
SECURITY_CONFIGURATION = dcm("110129", "Security Configuration")
SOFTWARE_CONFIGURATION = dcm("110131", "Software Configuration")
RESTRICTED_FUNCTION = dcm("110132", "Use of Restricted Function")
SECURITY_ROLES_CHANGED = dcm("110136", "Security Roles Changed")
USER_SECURITY_CHANGED = dcm("110137", "User security Attributes Changed")

ROLE_APPLICATION = dcm("110150", "Application")
ROLE_APPLICATION_LAUNCHER = dcm("110151", "Application Launcher")
ROLE_DESTINATION = dcm("110152", "Destination Role ID")
ROLE_SOURCE = dcm("110153", "Source Role ID")

ID_STUDY_UID = dcm("110180", "Study Instance UID")
ID_NODE = dcm("110182", "Node ID")
ID_PATIENT_NUMBER = rfc3881("2", "Patient Number")
ID_USER = rfc3881("11", "User Identifier")
ID_URI = rfc3881("12", "URI")

#: EventOutcomeIndicator values.
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = "0", "4", "8", "12"
#: ParticipantObjectTypeCode / TypeCodeRole values (RFC 3881).
TYPE_PERSON, TYPE_SYSTEM = "1", "2"
ROLE_PATIENT, ROLE_REPORT, ROLE_RESOURCE, ROLE_SECURITY_RESOURCE = "1", "3", "4", "13"
#: NetworkAccessPointTypeCode: 1 = machine name, 2 = IP address.
NAP_NAME, NAP_IP = "1", "2"


@dataclass(frozen=True)
class SourceInfo:
    """This node as the audit source and as a participant."""

    audit_source_id: str
    ae_title: str
    hostname: str
    enterprise_site_id: str = ""
    app_name: str = "anatomix-node"


class PatientLookup:
    """Patient ID and name of a study, read from one of its spooled instances (header only), cached."""

    def __init__(self, find_file: Callable[[str], Path | None], size: int = 256) -> None:
        self._find_file = find_file
        self._cache: OrderedDict[str, tuple[str, str] | None] = OrderedDict()
        self._size = size

    def __call__(self, study_instance_uid: str) -> tuple[str, str] | None:
        if study_instance_uid in self._cache:
            self._cache.move_to_end(study_instance_uid)
            return self._cache[study_instance_uid]
        found = self._read(study_instance_uid)
        self._cache[study_instance_uid] = found
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return found

    def _read(self, study_instance_uid: str) -> tuple[str, str] | None:
        import pydicom

        try:
            path = self._find_file(study_instance_uid)
            if path is None:
                return None
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID", "PatientName"])
        except Exception:  # purged, unreadable: the message goes without the patient object
            return None
        patient_id = str(ds.get("PatientID", "") or "")
        return (patient_id, str(ds.get("PatientName", "") or "")) if patient_id else None


# ---- XML --------------------------------------------------------------------------------------------


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code[0], "codeSystemName": code[1], "displayName": code[2], "originalText": code[2]})


def _text(value: Any, limit: int = 1024) -> str:
    """XML-safe text: control characters other than tab/newline dropped (peer-chosen AE titles)."""
    text = str(value)[:limit]
    return "".join(ch for ch in text if ch in "\t\n" or ord(ch) >= 32)


class _Message:
    def __init__(self, action: str, when: datetime, outcome: str, event_id: Code, types: list[Code], description: str | None) -> None:
        self.root = ET.Element("AuditMessage")
        ident = ET.SubElement(self.root, "EventIdentification", {
            "EventActionCode": action, "EventDateTime": when.astimezone(UTC).isoformat(timespec="milliseconds"),
            "EventOutcomeIndicator": outcome,
        })  # fmt: skip
        _coded(ident, "EventID", event_id)
        for code in types:
            _coded(ident, "EventTypeCode", code)
        if description:
            ET.SubElement(ident, "EventOutcomeDescription").text = _text(description)
        self._objects: list[ET.Element] = []
        self._source: ET.Element | None = None

    def participant(self, user_id: str, requestor: bool, roles: Sequence[Code] = (), alt: str | None = None,
                    name: str | None = None, host: str | None = None) -> None:  # fmt: skip
        attrs = {"UserID": _text(user_id or "unknown", 256), "UserIsRequestor": "true" if requestor else "false"}
        if alt:
            attrs["AlternativeUserID"] = _text(alt, 256)
        if name:
            attrs["UserName"] = _text(name, 256)
        if host:
            attrs["NetworkAccessPointID"] = _text(host, 256)
            attrs["NetworkAccessPointTypeCode"] = NAP_IP if _is_ip(host) else NAP_NAME
        element = ET.Element("ActiveParticipant", attrs)
        for role in roles:
            _coded(element, "RoleIDCode", role)
        self._insert_before_source(element)

    def _insert_before_source(self, element: ET.Element) -> None:
        if self._source is None:
            self.root.append(element)
        else:
            self.root.insert(list(self.root).index(self._source), element)

    def source(self, info: SourceInfo) -> None:
        attrs = {"AuditSourceID": _text(info.audit_source_id, 256)}
        if info.enterprise_site_id:
            attrs["AuditEnterpriseSiteID"] = _text(info.enterprise_site_id, 256)
        self._source = ET.SubElement(self.root, "AuditSourceIdentification", attrs)
        # 4 = Application Server process tier in a multi-tier system (RFC 3881 audit source types).
        _coded(self._source, "AuditSourceTypeCode", ("4", "DCM", "Application Server"))

    def participant_object(self, object_id: str, id_type: Code, type_code: str, role: str, name: str | None = None,
                           details: dict[str, Any] | None = None, sop_classes: dict[str, int] | None = None,
                           description: str | None = None) -> None:  # fmt: skip
        element = ET.SubElement(self.root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": _text(object_id, 256), "ParticipantObjectTypeCode": type_code,
            "ParticipantObjectTypeCodeRole": role,
        })  # fmt: skip
        _coded(element, "ParticipantObjectIDTypeCode", id_type)
        if name:
            ET.SubElement(element, "ParticipantObjectName").text = _text(name, 256)
        for key, value in (details or {}).items():
            encoded = base64.b64encode(json.dumps(value, sort_keys=True, default=str).encode()).decode()
            ET.SubElement(element, "ParticipantObjectDetail", {"type": key, "value": encoded})
        if sop_classes is not None or description:
            desc = ET.SubElement(element, "ParticipantObjectDescription")
            if description:
                desc.text = _text(description)
            for uid, count in sorted((sop_classes or {}).items()):
                ET.SubElement(desc, "SOPClass", {"UID": uid, "NumberOfInstances": str(count)})
        self._objects.append(element)

    def xml(self) -> bytes:
        return ET.tostring(self.root, encoding="utf-8", xml_declaration=True)


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _peer_ae(event: AuditEvent) -> str | None:
    return event.calling_ae or None


def _node(message: _Message, info: SourceInfo, requestor: bool, roles: Sequence[Code] = ()) -> None:
    """This node as a participant: its process (UserID), its AE title (AlternativeUserID)."""
    message.participant(info.app_name, requestor, list(roles), alt=f"AETITLES={info.ae_title}", host=info.hostname)


def _remote(message: _Message, event: AuditEvent, requestor: bool, roles: Sequence[Code] = ()) -> None:
    ae = _peer_ae(event)
    message.participant(ae or event.peer_host or "unknown", requestor, list(roles),
                        alt=f"AETITLES={ae}" if ae else None, host=event.peer_host)  # fmt: skip


def _study_objects(message: _Message, event: AuditEvent, patients: Callable[[str], tuple[str, str] | None] | None,
                   sop_classes: dict[str, int] | None = None, studies: list[str] | None = None) -> None:  # fmt: skip
    uids = studies if studies is not None else ([event.study_instance_uid] if event.study_instance_uid else [])
    seen_patients: set[str] = set()
    for uid in uids:
        message.participant_object(uid, ID_STUDY_UID, TYPE_SYSTEM, ROLE_REPORT,
                                   sop_classes=sop_classes if len(uids) == 1 else None)  # fmt: skip
        patient = patients(uid) if patients else None
        if patient and patient[0] not in seen_patients:
            seen_patients.add(patient[0])
            message.participant_object(patient[0], ID_PATIENT_NUMBER, TYPE_PERSON, ROLE_PATIENT, name=patient[1] or None)


_ADMIN_TYPES = {"remote_node": NETWORK_CONFIGURATION, "settings": SOFTWARE_CONFIGURATION, "account": USER_SECURITY_CHANGED,
                "role": SECURITY_ROLES_CHANGED, "token": USER_SECURITY_CHANGED, "tls": SECURITY_CONFIGURATION}  # fmt: skip


#: The operations API's own event names (dicom_node.api.deps) and the message each one is.
_API_EVENTS = {"api_login": "login", "api_login_failed": "login_failed", "api_login_rate_limited": "login_failed",
               "api_logout": "logout", "api_change": "admin_change"}  # fmt: skip


def audit_message(event: AuditEvent, info: SourceInfo, patients: Callable[[str], tuple[str, str] | None] | None = None) -> tuple[bytes, int]:
    """The PS3.15 A.5 XML of one audit row and its syslog severity."""
    d = event.detail or {}
    name = _API_EVENTS.get(event.event, event.event)
    if event.event == "api_change":  # the API names its change "action" (e.g. node.add): same message as the CLI's
        d = {**d, "what": str(d.get("action") or "settings").replace("node.", "remote_node.").replace("user.", "account.")}
    severity = SEVERITY_NOTICE
    reason = d.get("reason")
    if name in ("association_accepted", "association_rejected", "association_released", "association_aborted",
                "association_rejected_summary", "connections_summary") and not (
            name in ("association_released", "association_aborted") and d.get("received")):  # fmt: skip
        # Node authentication: accepted / released (success) or refused, aborted, flooded (failure).
        ok = name in ("association_accepted", "association_released")
        text = {"association_rejected_summary": f"{d.get('count')} further associations rejected, calling AEs {d.get('calling_aes')}",
                "connections_summary": f"{d.get('count')} connections {d.get('kind')}"}.get(name, name.replace("_", " "))  # fmt: skip
        if reason:
            text += f": {reason}"
        m = _Message("E", event.at, SUCCESS if ok else MINOR_FAILURE, SECURITY_ALERT, [NODE_AUTHENTICATION], text)
        severity = SEVERITY_NOTICE if ok else SEVERITY_WARNING
        _remote(m, event, True)
        _node(m, info, False)
        m.source(info)
        m.participant_object(event.peer_host or "unknown", ID_NODE, TYPE_SYSTEM, ROLE_RESOURCE, name=_peer_ae(event), description=text)
    elif (name == "instance_rejected" and not event.study_instance_uid) or (name == "stow_request" and not d.get("studies")):
        # Refused before its header was read (or a STOW-RS request that stored nothing): no study to
        # name; the sender is the alert's subject.
        if name == "stow_request":
            text = (
                f"STOW-RS request stored nothing ({d.get('refused', 0)} refused)"
                if not d.get("refused_request")
                else f"STOW-RS request refused with HTTP {d['refused_request']}"
            )
        else:
            text = f"instance {event.sop_instance_uid or ''} refused"
        text += f": {reason}" if reason else ""
        m = _Message("C", event.at, MINOR_FAILURE, SECURITY_ALERT, [RESTRICTED_FUNCTION], text)
        severity = SEVERITY_WARNING
        _remote(m, event, True)
        _node(m, info, False)
        m.source(info)
        m.participant_object(event.peer_host or "unknown", ID_NODE, TYPE_SYSTEM, ROLE_RESOURCE, name=_peer_ae(event), description=text)
    elif name in ("association_released", "association_aborted", "instance_rejected", "instance_new_version",
                  "instance_flagged", "instance_recovered", "stow_request"):  # fmt: skip
        # Received by us: DICOM Instances Transferred (we are the destination).
        failed = name in ("association_aborted", "instance_rejected") or bool(d.get("refused_request"))
        text = f"{name.replace('_', ' ')}: {d.get('received', 1 if not failed else 0)} received" + (f": {reason}" if reason else "")
        m = _Message("C", event.at, MINOR_FAILURE if failed else SUCCESS, INSTANCES_TRANSFERRED, [], text)
        _remote(m, event, True, [ROLE_SOURCE])
        _node(m, info, False, [ROLE_DESTINATION])
        m.source(info)
        _study_objects(m, event, patients, studies=d.get("studies") if isinstance(d.get("studies"), list) else None)
    elif name in ("objects_send_started", "objects_sent"):
        sent, failed = d.get("sent", []), d.get("failed", {})
        classes = {uid: 0 for uid in set((d.get("sop_classes") or {}).values())}
        for sop_uid, cls in (d.get("sop_classes") or {}).items():
            if name == "objects_send_started" or sop_uid in sent:
                classes[cls] += 1
        if name == "objects_send_started":
            m = _Message("E", event.at, SUCCESS, BEGIN_TRANSFERRING, [], f"to {d.get('destination')}")
        else:
            outcome = SUCCESS if not failed else (MINOR_FAILURE if sent else SERIOUS_FAILURE)
            text = f"to {d.get('destination')}: {len(sent)} sent, {len(failed)} not sent"
            m = _Message("C", event.at, outcome, INSTANCES_TRANSFERRED, [], text)
            severity = SEVERITY_NOTICE if not failed else SEVERITY_WARNING
        _node(m, info, True, [ROLE_SOURCE])
        _remote(m, event, False, [ROLE_DESTINATION])
        m.source(info)
        _study_objects(m, event, patients, sop_classes={k: v for k, v in classes.items() if v} or None)
    elif name in ("login", "login_failed", "logout"):
        ok = name != "login_failed"
        m = _Message("E", event.at, SUCCESS if ok else MINOR_FAILURE, USER_AUTHENTICATION,
                     [LOGOUT if name == "logout" else LOGIN], reason)  # fmt: skip
        severity = SEVERITY_NOTICE if ok else SEVERITY_WARNING
        m.participant(event.user or "unknown", True, host=event.peer_host)
        _node(m, info, False)
        m.source(info)
    elif name == "admin_change":
        what = str(d.get("what", "settings"))
        code = _ADMIN_TYPES.get(what.split(".")[0], SOFTWARE_CONFIGURATION)
        m = _Message("E", event.at, SUCCESS, SECURITY_ALERT, [code], f"{what} {d.get('target')}")
        m.participant(event.user or "unknown", True, host=event.peer_host)
        _node(m, info, False)
        m.source(info)
        m.participant_object(str(d.get("target") or what), ID_URI, TYPE_SYSTEM, ROLE_SECURITY_RESOURCE, name=what,
                             details={"before": d.get("before"), "after": d.get("after")})  # fmt: skip
    elif name == "audit_exported":
        m = _Message("R", event.at, SUCCESS, AUDIT_LOG_USED, [], f"{d.get('count')} events, filters {d.get('filters')}")
        m.participant(event.user or "unknown", True, host=event.peer_host)
        _node(m, info, False)
        m.source(info)
        m.participant_object(f"urn:anatomix-node:{info.audit_source_id}:audit-trail", ID_URI, TYPE_SYSTEM,
                             ROLE_SECURITY_RESOURCE, name="Security Audit Log")  # fmt: skip
    elif name in ("application_started", "application_stopped"):
        m = _Message("E", event.at, SUCCESS, APPLICATION_ACTIVITY,
                     [APPLICATION_START if name == "application_started" else APPLICATION_STOP], None)  # fmt: skip
        _node(m, info, False, [ROLE_APPLICATION])
        if event.user:
            m.participant(event.user, True, [ROLE_APPLICATION_LAUNCHER])
        m.source(info)
    elif name == "study_purged":
        m = _Message("D", event.at, SUCCESS, STUDY_DELETED, [], reason)
        _node(m, info, True)
        m.source(info)
        _study_objects(m, event, patients)
    elif event.study_instance_uid:
        # Analysis, stable, reanalysis and resend commands: the node (or an admin) used the study's instances.
        failed = d.get("outcome") == "failed"
        m = _Message("E", event.at, MINOR_FAILURE if failed else SUCCESS, INSTANCES_ACCESSED, [],
                     f"{name.replace('_', ' ')}" + (f": {d.get('summary')}" if d.get("summary") else ""))  # fmt: skip
        if event.user:
            m.participant(event.user, True, host=event.peer_host)
        _node(m, info, not event.user)
        m.source(info)
        _study_objects(m, event, patients)
    else:
        m = _Message("E", event.at, SUCCESS, SECURITY_ALERT, [RESTRICTED_FUNCTION], name.replace("_", " "))
        if event.user:
            m.participant(event.user, True, host=event.peer_host)
        _node(m, info, not event.user)
        m.source(info)
    return m.xml(), severity


# ---- syslog -----------------------------------------------------------------------------------------


def _header_field(value: str, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII without spaces, or NILVALUE."""
    cleaned = "".join(ch for ch in value if 33 <= ord(ch) <= 126)[:limit]
    return cleaned or "-"


def _sd_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def syslog_message(event: AuditEvent, xml: bytes, severity: int, hostname: str, app_name: str, procid: int | None = None) -> bytes:
    """One RFC 5424 message: ``<PRI>1 TIMESTAMP HOST APP PROCID MSGID [SD] BOM XML``."""
    pri = FACILITY_AUTHPRIV * 8 + severity
    timestamp = event.at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    sd = f'[{SD_ID} eventId="{event.id}" event="{_sd_value(event.event)}"]'
    header = (
        f"<{pri}>1 {timestamp} {_header_field(hostname, 255)} {_header_field(app_name, 48)} "
        f"{_header_field(str(procid) if procid is not None else '', 128)} {MSGID} {sd} "
    )
    return header.encode("ascii") + b"\xef\xbb\xbf" + xml


def octet_counted(message: bytes) -> bytes:
    """RFC 6587 3.4.1 / RFC 5425 4.3: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode("ascii") + b" " + message


def local_hostname() -> str:
    return socket.getfqdn() or socket.gethostname()
