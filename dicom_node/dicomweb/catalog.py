"""What the node serves over DICOMweb (QIDO-RS, WADO-RS): the received instances and the result objects of each study.

A study holds two kinds of stored objects, both in the state store with the path of their file:

* received instances (``instances`` rows, files in ``storage.spool_dir``): for each SOP Instance UID the
  newest row, since a re-sent instance with other bytes is a second row of the same UID;
* result objects (``produced_objects`` rows, files in ``storage.results_dir``) of the newest analysis
  version that made any: a reanalysis as a new version gives new UIDs, and a viewer should show the
  results of that version, not two sets side by side.

The store keeps no patient or series attributes, so they are read from the files' headers (never the
pixel data) and cached in this process: spooled files are content-addressed and never rewritten, and a
result file is keyed by its size and modification time, so a cached header is never stale. A study that
was purged, or whose files are gone, has no objects to serve.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.settings import Settings
from dicom_node.store.base import Store, StudyRecord

log = logging.getLogger(__name__)

#: Headers kept in memory per process (an SR's header is the largest, tens of kB).
HEADER_CACHE_SIZE = 2048


@dataclass(frozen=True)
class StoredObject:
    """One DICOM object the node can serve: its UIDs, where its file is, and what it is."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path
    #: The result kind (``sr``, ``seg``, ...) of a result object; None for a received instance.
    result_kind: str | None = None

    def header(self) -> Dataset:
        """The file's data set up to the pixel data (cached; shared, so never change it)."""
        return read_header(self.path)


class _HeaderCache:
    """A small LRU of parsed headers keyed by (path, size, mtime)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, int, int], Dataset] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path) -> Dataset:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return found
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        with self._lock:
            self._items[key] = dataset
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return dataset


_headers = _HeaderCache(HEADER_CACHE_SIZE)


def read_header(path: Path) -> Dataset:
    """The header of a stored file (OSError if it is gone, InvalidDicomError if it is not DICOM)."""
    return _headers.get(path)


def servable_study(store: Store, study_instance_uid: str) -> StudyRecord | None:
    """The study if the node holds it (not purged), else None."""
    study = store.get_study(study_instance_uid)
    if study is None or study.state == "purged":
        return None
    return study


def study_objects(store: Store, settings: Settings, study_instance_uid: str) -> list[StoredObject]:
    """Every object of the study the node can serve: received instances first (oldest first), then results.

    Objects whose file is missing or unreadable are left out (and logged): a retention pass may be
    removing the study while it is read.
    """
    newest: dict[str, StoredObject] = {}
    for row in store.list_instances(study_instance_uid):  # oldest first: a later row of a UID replaces an earlier one
        newest[row.sop_instance_uid] = StoredObject(
            row.study_instance_uid, row.series_instance_uid, row.sop_instance_uid, row.sop_class_uid,
            row.transfer_syntax_uid, settings.storage.spool_dir / row.path,
        )  # fmt: skip
    objects = [o for o in newest.values() if o.path.is_file()]
    produced = store.list_produced_objects(study_instance_uid)
    if produced:
        version = max(p.study_version for p in produced)
        for p in produced:
            if p.study_version != version:
                continue
            path = settings.storage.results_dir / p.path
            try:
                header = read_header(path)
            except (OSError, InvalidDicomError) as exc:
                log.warning("DICOMweb: result object %s of study %s is not readable (%s): left out", p.sop_instance_uid, study_instance_uid, exc)
                continue
            syntax = str(getattr(header.file_meta, "TransferSyntaxUID", "") or "1.2.840.10008.1.2.1")
            objects.append(StoredObject(study_instance_uid, str(header.SeriesInstanceUID), p.sop_instance_uid, p.sop_class_uid, syntax, path, p.kind))
    return objects


def first_received(store: Store, settings: Settings, study_instance_uid: str) -> StoredObject | None:
    """The study's first received instance whose file is there (what a study search reads patient and study attributes from)."""
    for row in store.list_instances(study_instance_uid):
        path = settings.storage.spool_dir / row.path
        if path.is_file():
            return StoredObject(row.study_instance_uid, row.series_instance_uid, row.sop_instance_uid, row.sop_class_uid,
                                row.transfer_syntax_uid, path)  # fmt: skip
    return None


def series_of(objects: list[StoredObject]) -> dict[str, list[StoredObject]]:
    """The objects grouped by series, series in order of their first object."""
    grouped: dict[str, list[StoredObject]] = {}
    for obj in objects:
        grouped.setdefault(obj.series_instance_uid, []).append(obj)
    return grouped
