"""QIDO-RS (PS3.18 section 10.6) over the node's stored objects: parsing a search, matching, the answer.

A search names attributes by keyword (``PatientName``) or tag (``00100020``) with PS3.4 C.2.2.2
matching: a list of UIDs (``uid1,uid2``), a date or time range (``20260101-20261231``, ``-20260101``),
``*`` and ``?`` wildcards (patient names case-insensitively), an empty value (every object), otherwise
equality; a multi-valued attribute matches when one of its values does. ``includefield`` (repeatable,
comma-separated, or ``all``) adds attributes to the answer, ``limit`` and ``offset`` page it, and
``fuzzymatching`` is accepted and not applied. Anything else is a :class:`BadQuery` (HTTP 400).

The answer's attributes come from the files' headers (:mod:`dicom_node.dicomweb.catalog`): a study's
from its first instance, a series' from its first object, with the counts, ``ModalitiesInStudy``,
``SOPClassesInStudy`` and ``RetrieveURL`` computed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicom_node.dicomweb.catalog import StoredObject, first_received, series_of, servable_study, study_objects
from dicom_node.settings import Settings
from dicom_node.store.base import Store

#: What each level answers without includefield (PS3.18 Tables 10.6.3-3 to -5, the ones the node can know).
STUDY_FIELDS = ("SpecificCharacterSet", "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName",
                "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID", "StudyDescription",
                "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "RetrieveURL")  # fmt: skip
SERIES_FIELDS = ("SpecificCharacterSet", "Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime",
                 "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime", "NumberOfSeriesRelatedInstances",
                 "RetrieveURL")  # fmt: skip
INSTANCE_FIELDS = ("SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "InstanceAvailability", "TimezoneOffsetFromUTC",
                   "RetrieveURL", "InstanceNumber", "Rows", "Columns", "BitsAllocated", "NumberOfFrames", "ContentDate",
                   "ContentTime")  # fmt: skip
#: Keyword -> tag of every field above.
_FIELD_TAGS = {k: int(Tag(k)) for k in {*STUDY_FIELDS, *SERIES_FIELDS, *INSTANCE_FIELDS}}
#: Study attributes computed over the study's objects, not read from a header.
COMPUTED_STUDY_TAGS = frozenset({0x00080061, 0x00080062, 0x00201206, 0x00201208, 0x00081190})
CONTROL = ("includefield", "limit", "offset", "fuzzymatching")
MAX_LIMIT = 10_000
_NUMBER = re.compile(r"^[0-9]+$")


class BadQuery(ValueError):
    """A search parameter the node cannot apply (HTTP 400)."""


@dataclass(frozen=True)
class Query:
    #: (tag, keyword, value) per matching attribute.
    matches: tuple[tuple[int, str, str], ...] = ()
    include: frozenset[int] = frozenset()
    include_all: bool = False
    limit: int | None = None
    offset: int = 0


def _tag_of(name: str) -> tuple[int, str]:
    """A keyword or an 8-digit hex tag -> (tag, keyword); BadQuery for anything unknown."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        tag = int(name, 16)
        keyword = keyword_for_tag(tag)
        if not keyword:
            raise BadQuery(f"{name} is not a tag of the DICOM dictionary")
        return tag, keyword
    found = tag_for_keyword(name)
    if found is None:
        hint = " (attributes of sequences cannot be matched)" if "." in name else ""
        raise BadQuery(f"{name!r} is neither a DICOM keyword nor an 8-digit tag, nor one of {', '.join(CONTROL)}{hint}")
    return int(found), name


def parse_query(items: list[tuple[str, str]]) -> Query:
    """The query parameters of a search (any level: the answer's fields are chosen by the search)."""
    matches: list[tuple[int, str, str]] = []
    include: set[int] = set()
    include_all, limit, offset = False, None, 0
    for name, value in items:
        if name == "includefield":
            for piece in filter(None, (p.strip() for p in value.split(","))):
                if piece == "all":
                    include_all = True
                else:
                    include.add(_tag_of(piece)[0])
        elif name in ("limit", "offset"):
            if not _NUMBER.match(value):
                raise BadQuery(f"{name} must be a non-negative integer, not {value!r}")
            if name == "limit":
                limit = min(int(value), MAX_LIMIT)
            else:
                offset = int(value)
        elif name == "fuzzymatching":
            if value not in ("true", "false"):
                raise BadQuery(f"fuzzymatching must be true or false, not {value!r}")
        else:
            tag, keyword = _tag_of(name)
            _check_value(keyword, dictionary_VR(tag), value)
            matches.append((tag, keyword, value))
    return Query(tuple(matches), frozenset(include), include_all, limit, offset)


def _check_value(keyword: str, vr: str, value: str) -> None:
    if vr in ("DA", "TM", "DT"):
        for bound in value.split("-") if "-" in value else [value]:
            if bound and not re.fullmatch(r"[0-9.:+ ]+", bound):
                raise BadQuery(f"{keyword} ({vr}) takes a value or a range such as 20260101-20261231, not {value!r}")
    if vr == "SQ":
        raise BadQuery(f"{keyword} is a sequence: sequences cannot be matched")


# ---- matching ----------------------------------------------------------------------------------------------


def _values(dataset: Dataset, tag: int) -> list[str]:
    if tag not in dataset:
        return []
    value = dataset[tag].value
    if value is None or value == "":
        return []
    items = value if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue" else [value]
    return [str(v) for v in items]


def _wildcard(pattern: str, case_insensitive: bool) -> re.Pattern[str]:
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(f"^{body}$", re.IGNORECASE if case_insensitive else 0)


def matches(dataset: Dataset, tag: int, vr: str, pattern: str) -> bool:
    """PS3.4 C.2.2.2 matching of one attribute of ``dataset`` against ``pattern``."""
    if pattern in ("", "*"):
        return True
    values = _values(dataset, tag)
    if vr == "UI":
        wanted = {p.strip() for p in re.split(r"[,\\]", pattern) if p.strip()}
        return any(v in wanted for v in values)
    if vr in ("DA", "TM", "DT") and "-" in pattern.lstrip("+"):
        low, _, high = pattern.partition("-")
        low, high = low.replace(":", ""), high.replace(":", "")
        return any((not low or v.replace(":", "") >= low) and (not high or v.replace(":", "")[: len(high)] <= high) for v in values)
    if vr in ("DA", "TM", "DT"):
        return any(v.replace(":", "").startswith(pattern.replace(":", "")) for v in values)
    if "*" in pattern or "?" in pattern:
        regex = _wildcard(pattern, vr == "PN")
        return any(regex.match(v) for v in values)
    if vr == "PN":
        return any(v.lower() == pattern.lower() for v in values)
    return pattern in values


def _all_match(record: Dataset, query: Query) -> bool:
    return all(matches(record, tag, dictionary_VR(tag), value) for tag, _, value in query.matches)


# ---- records -----------------------------------------------------------------------------------------------


def _record(header: Dataset, fields: tuple[str, ...], query: Query) -> Dataset:
    """The answer for one object: the level's fields, the ones asked for, and the matched ones (empty if absent)."""
    tags = {_FIELD_TAGS[k] for k in fields} | set(query.include) | {t for t, _, _ in query.matches}
    if query.include_all:
        tags |= {int(e.tag) for e in header if e.tag.group != 0x7FE0 and not e.tag.is_private}
    record = Dataset()
    for tag in sorted(tags):
        if tag in header:
            record[tag] = header[tag]
        else:
            record.add_new(tag, dictionary_VR(tag), None)
    return record


def _study_record(objects: list[StoredObject], query: Query, base: str) -> Dataset:
    header = objects[0].header()
    record = _record(header, STUDY_FIELDS, query)
    series = series_of(objects)
    modalities = sorted({str(group[0].header().get("Modality", "")) for group in series.values()} - {""})
    record.ModalitiesInStudy = modalities
    record.NumberOfStudyRelatedSeries = len(series)
    record.NumberOfStudyRelatedInstances = len(objects)
    if query.include_all or 0x00080062 in query.include:
        record.SOPClassesInStudy = sorted({o.sop_class_uid for o in objects})
    record.RetrieveURL = f"{base}/studies/{header.StudyInstanceUID}"
    return record


def _series_record(objects: list[StoredObject], query: Query, base: str) -> Dataset:
    first = objects[0]
    record = _record(first.header(), SERIES_FIELDS, query)
    record.StudyInstanceUID = first.study_instance_uid
    record.NumberOfSeriesRelatedInstances = len(objects)
    record.RetrieveURL = f"{base}/studies/{first.study_instance_uid}/series/{first.series_instance_uid}"
    return record


def _instance_record(obj: StoredObject, query: Query, base: str) -> Dataset:
    record = _record(obj.header(), INSTANCE_FIELDS, query)
    record.StudyInstanceUID, record.SeriesInstanceUID = obj.study_instance_uid, obj.series_instance_uid
    record.InstanceAvailability = "ONLINE"
    record.RetrieveURL = f"{base}/studies/{obj.study_instance_uid}/series/{obj.series_instance_uid}/instances/{obj.sop_instance_uid}"
    return record


def _page(records: list[Dataset], query: Query) -> list[dict[str, Any]]:
    chosen = records[query.offset :]
    if query.limit is not None:
        chosen = chosen[: query.limit]
    return [r.to_json_dict(bulk_data_threshold=1 << 30, suppress_invalid_tags=True) for r in chosen]


# ---- the three searches ------------------------------------------------------------------------------------


def search_studies(store: Store, settings: Settings, query: Query, base: str) -> list[dict[str, Any]]:
    """Studies the node holds (newest first) that match; stops reading headers once the page is full."""
    uid_filter = next((value for tag, _, value in query.matches if tag == 0x0020000D and value), None)
    if uid_filter:
        wanted = [u.strip() for u in re.split(r"[,\\]", uid_filter) if u.strip()]
        found = [s for s in (servable_study(store, uid) for uid in dict.fromkeys(wanted)) if s is not None]
        candidates = sorted(found, key=lambda s: s.created_at, reverse=True)  # newest first, as without the list
    else:
        candidates = [s for s in store.list_studies(limit=100_000) if s.state != "purged"]
    end = None if query.limit is None else query.offset + query.limit
    records: list[Dataset] = []
    from_header = [(tag, value) for tag, _, value in query.matches if tag not in COMPUTED_STUDY_TAGS]
    for study in candidates:
        # First the attributes the first received instance's header holds (one query, a cached header):
        # most studies fail here, before their results and series are read.
        first = first_received(store, settings, study.study_instance_uid)
        if first is not None and not all(matches(first.header(), tag, dictionary_VR(tag), value) for tag, value in from_header):
            continue
        objects = study_objects(store, settings, study.study_instance_uid)
        if not objects:
            continue
        record = _study_record(objects, query, base)
        if _all_match(record, query):
            records.append(record)
            if end is not None and len(records) >= end:
                break
    return _page(records, query)


def search_series(objects: list[StoredObject], query: Query, base: str) -> list[dict[str, Any]]:
    records = [_series_record(group, query, base) for group in series_of(objects).values()]
    return _page([r for r in records if _all_match(r, query)], query)


def search_instances(objects: list[StoredObject], query: Query, base: str) -> list[dict[str, Any]]:
    records = [_instance_record(o, query, base) for o in objects]
    return _page([r for r in records if _all_match(r, query)], query)
