"""Deterministic UIDs: the same inputs always give the same UID, so a retry never makes a second copy.

A UID is ``<uid_root><decimal digest>``: the digest is the first 128 bits of SHA-256 over the inputs,
written as a decimal integer (at most 39 digits), cut so the whole UID fits in 64 characters. With a
uid_root of at most 24 characters the full 128 bits survive; a longer root (settings allow 40) keeps
at least 24 digits (~80 bits), still far beyond any collision risk for one site.
"""

from __future__ import annotations

import hashlib
import re

MAX_UID_LENGTH = 64
_ROOT = re.compile(r"^[1-9]\d*(\.(0|[1-9]\d*))*\.$")
_UID = re.compile(r"^(0|[1-9]\d*)(\.(0|[1-9]\d*))*$")


def check_uid_root(uid_root: str) -> None:
    """ValueError unless ``uid_root`` is digits and dots ending in '.', short enough to add 24 digits."""
    if not isinstance(uid_root, str) or not _ROOT.match(uid_root):
        raise ValueError(f"uid_root {uid_root!r} must be digits and dots ending in '.', e.g. '1.2.826.0.1.3680043.10.1431.'")
    if len(uid_root) > MAX_UID_LENGTH - 24:
        raise ValueError(f"uid_root {uid_root!r} is {len(uid_root)} characters; at most {MAX_UID_LENGTH - 24} leave room for the digest")


def is_valid_uid(uid: str) -> bool:
    """True for a syntactically valid DICOM UID (PS3.5 9.1)."""
    return isinstance(uid, str) and 0 < len(uid) <= MAX_UID_LENGTH and bool(_UID.match(uid))


def hash_uid(uid_root: str, *parts: str | int) -> str:
    """``uid_root`` + a decimal digest of ``parts`` (joined unambiguously), at most 64 characters."""
    check_uid_root(uid_root)
    text = "\x1f".join(str(part) for part in parts)
    digest = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:16], "big")
    digits = str(digest)[: MAX_UID_LENGTH - len(uid_root)]
    # A decimal integer never starts with 0, so the last component is always valid.
    return uid_root + digits


def derive_uid(uid_root: str, source_sop_instance_uid: str, device_uid: str, analysis_version: int, kind: str) -> str:
    """SOP Instance UID of the ``kind`` object made from one source image by one model version.

    ``kind`` is an object kind ("sr", "seg", ...) or any other stable name (tracking UIDs use
    ``"track/<annotation id>"``).
    """
    _check_inputs(source_sop_instance_uid, device_uid, analysis_version, kind)
    return hash_uid(uid_root, "instance", source_sop_instance_uid, device_uid, analysis_version, kind)


def derive_series_uid(uid_root: str, study_instance_uid: str, device_uid: str, analysis_version: int, kind: str) -> str:
    """Series Instance UID: one new series per (study, model device, analysis version, object kind)."""
    if not is_valid_uid(study_instance_uid):
        raise ValueError(f"study_instance_uid {study_instance_uid!r} is not a valid DICOM UID")
    _check_inputs(study_instance_uid, device_uid, analysis_version, kind)
    return hash_uid(uid_root, "series", study_instance_uid, device_uid, analysis_version, kind)


def _check_inputs(source_uid: str, device_uid: str, analysis_version: int, kind: str) -> None:
    if not is_valid_uid(source_uid):
        raise ValueError(f"source_sop_instance_uid {source_uid!r} is not a valid DICOM UID")
    if not is_valid_uid(device_uid):
        raise ValueError(f"device_uid {device_uid!r} is not a valid DICOM UID (ModelIdentity.device_uid)")
    if isinstance(analysis_version, bool) or not isinstance(analysis_version, int) or analysis_version < 1:
        raise ValueError(f"analysis_version {analysis_version!r} must be an integer >= 1")
    if not kind:
        raise ValueError("kind must be a non-empty object kind such as 'sr'")
