"""The durable spool: received instances as files, written so that a crash leaves all or nothing.

Layout (relative to ``settings.storage.spool_dir``)::

    <StudyInstanceUID>/<SOPInstanceUID>.<sha256[:16]>.dcm   one file per distinct byte content
    .tmp/<random>.part                                      writes in progress (swept at start-up)
    .quarantine/<StudyInstanceUID>/...                      unrecorded files that fail the start-up check

A file is written to ``.tmp``, flushed and fsync'd, renamed into its study directory (atomic on
one file system) and the directory is fsync'd, so after :func:`write_instance` returns the file
survives a power cut under its final name, and before that nothing under a final name exists.
The name is content-addressed: the same bytes sent twice land on the same name, and a second
version of an instance (same UID, other bytes) gets a second file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

TEMP_DIR_NAME = ".tmp"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class SpoolFull(OSError):
    """The spool's file system is below the free-space watermark (answer 0xA700, sender retries)."""


@dataclass(frozen=True)
class SpooledFile:
    """An instance durably in the spool."""

    #: Path relative to the spool directory (what the state store records).
    relative_path: str
    size: int
    sha256: str
    #: False when a file with this exact content was already there (a re-sent duplicate).
    created: bool


def is_valid_uid(value: str) -> bool:
    """A DICOM UID: digits and dots, at most 64 characters (safe as a file name, too)."""
    return len(value) <= 64 and bool(_UID.match(value))


def temp_dir(spool_dir: Path) -> Path:
    return spool_dir / TEMP_DIR_NAME


def prepare_spool(spool_dir: Path) -> int:
    """Create the spool directories and delete leftovers of interrupted writes; return how many.

    A ``.part`` file is never acknowledged (the rename had not happened), so deleting it loses
    nothing: the sender got no Success and sends the instance again.
    """
    temp = temp_dir(spool_dir)
    temp.mkdir(parents=True, exist_ok=True)
    removed = 0
    for leftover in temp.glob("*.part"):
        leftover.unlink(missing_ok=True)
        removed += 1
    if removed:
        log.info("spool: removed %d partial file(s) left by an interrupted write", removed)
    return removed


def free_bytes(spool_dir: Path) -> int:
    """Bytes available to this (unprivileged) process on the spool's file system."""
    stats = os.statvfs(spool_dir)
    return stats.f_bavail * stats.f_frsize


def check_free_space(spool_dir: Path, min_free_bytes: int, incoming_size: int) -> None:
    """Raise SpoolFull unless writing ``incoming_size`` bytes keeps ``min_free_bytes`` free."""
    available = free_bytes(spool_dir)
    if available - incoming_size < min_free_bytes:
        raise SpoolFull(
            f"spool {spool_dir} has {available} bytes free; an instance of {incoming_size} bytes would leave "
            f"less than storage.min_free_bytes = {min_free_bytes}: free disk space or lower the watermark"
        )


def instance_relative_path(study_instance_uid: str, sop_instance_uid: str, sha256: str) -> str:
    return f"{study_instance_uid}/{sop_instance_uid}.{sha256[:16]}.dcm"


def _sync_data(fd: int) -> None:
    """fdatasync where the platform has it (the data and the size, not the timestamps), else fsync.

    The ``os`` functions are looked up at call time, never bound at import: the durability tests
    record the order of these calls by wrapping ``os.fdatasync``/``os.replace``/``os.fsync``
    (tests/dicom_node/test_spool.py), so every durability step must go through the ``os`` module.
    """
    sync = getattr(os, "fdatasync", None) or os.fsync
    sync(fd)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_instance(
    spool_dir: Path,
    study_instance_uid: str,
    sop_instance_uid: str,
    parts: list[bytes],
    fsync: bool = True,
) -> SpooledFile:
    """Write ``parts`` (Part 10 preamble + meta, then the data set as received) durably.

    The UIDs must already be validated (:func:`is_valid_uid`): they become path components.
    Raises OSError (ENOSPC, EIO, ...) with no temporary file left behind.
    """
    digest = hashlib.sha256()
    size = 0
    for part in parts:
        digest.update(part)
        size += len(part)
    sha256 = digest.hexdigest()
    relative = instance_relative_path(study_instance_uid, sop_instance_uid, sha256)
    final = spool_dir / relative
    if final.exists():
        # Same name = same SOP Instance UID and same content; it was renamed into place complete.
        return SpooledFile(relative, size, sha256, created=False)

    temp = temp_dir(spool_dir) / f"{secrets.token_hex(8)}.part"
    try:
        with open(temp, "wb") as handle:
            for part in parts:
                handle.write(part)
            handle.flush()
            if fsync:
                # fdatasync: the data and the size, not the timestamps; enough to read the file back.
                _sync_data(handle.fileno())
        _rename_into_place(spool_dir, temp, final, fsync)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return SpooledFile(relative, size, sha256, created=True)


def adopt_instance(spool_dir: Path, study_instance_uid: str, sop_instance_uid: str, temp: Path, sha256: str, size: int) -> SpooledFile:
    """Move a complete file (a STOW-RS part written to :func:`temp_dir`) durably into place.

    ``sha256`` and ``size`` are the file's, computed while it was received. When a file with this
    content is already in place, nothing moves (``created=False``) and ``temp`` stays the caller's
    (to delete, or to adopt again if a purge removes the other meanwhile: :func:`ensure_adopted`).
    Raises OSError (ENOSPC, EIO, ...) with ``temp`` untouched.
    """
    relative = instance_relative_path(study_instance_uid, sop_instance_uid, sha256)
    final = spool_dir / relative
    if final.exists():
        return SpooledFile(relative, size, sha256, created=False)
    fd = os.open(temp, os.O_RDONLY)
    try:
        _sync_data(fd)
    finally:
        os.close(fd)
    _rename_into_place(spool_dir, temp, final, fsync=True)
    return SpooledFile(relative, size, sha256, created=True)


def _rename_into_place(spool_dir: Path, temp: Path, final: Path, fsync: bool) -> None:
    """Rename a synced temporary file to its final name, then make the rename durable."""
    study_dir = final.parent
    new_dir = not study_dir.exists()
    if new_dir:
        study_dir.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(temp, final)
    except FileNotFoundError:
        if not temp.exists():
            raise
        # The retention pass removed the (empty) study directory in between: make it again.
        new_dir = True
        study_dir.mkdir(parents=True, exist_ok=True)
        os.replace(temp, final)
    if fsync:
        # The rename is durable only once the directory entry is; a new study directory's own
        # entry lives in the spool directory.
        _fsync_directory(study_dir)
        if new_dir:
            _fsync_directory(spool_dir)


def ensure_spooled(spool_dir: Path, spooled: SpooledFile, study_instance_uid: str, sop_instance_uid: str, parts: list[bytes]) -> None:
    """After recording: make sure a file we did not write ourselves (``created=False``) is still there.

    ``write_instance`` found the content-addressed file already present; if a retention pass purged
    that study before our row was committed, the file is gone now although our new row points to
    it. Write it again (same bytes, same name) before the sender hears Success.
    """
    if spooled.created or (spool_dir / spooled.relative_path).exists():
        return
    log.warning("spool: %s was removed by a purge while it was being recorded; writing it again", spooled.relative_path)
    write_instance(spool_dir, study_instance_uid, sop_instance_uid, parts)


def ensure_adopted(spool_dir: Path, spooled: SpooledFile, study_instance_uid: str, sop_instance_uid: str, temp: Path) -> None:
    """:func:`ensure_spooled` for an adopted file: the one found in place was purged since, adopt ``temp``."""
    if spooled.created or (spool_dir / spooled.relative_path).exists():
        return
    log.warning("spool: %s was removed by a purge while it was being recorded; writing it again", spooled.relative_path)
    adopt_instance(spool_dir, study_instance_uid, sop_instance_uid, temp, spooled.sha256, spooled.size)


def remove_instance(spool_dir: Path, relative_path: str) -> None:
    """Delete a spooled file (used when the state store refused to record it)."""
    (spool_dir / relative_path).unlink(missing_ok=True)
