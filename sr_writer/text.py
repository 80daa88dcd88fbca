"""Text that goes into DICOM attributes: VR length limits, Code String rules, character sets."""

from __future__ import annotations

import re
from collections.abc import Iterable

import pydicom
from pydicom.charset import _encode_string_impl, _encode_string_parts, convert_encodings

#: Maximum characters per value (PS3.5 table 6.2-1) for the VRs we write free text into.
VR_MAX_CHARS = {"CS": 16, "SH": 16, "LO": 64, "ST": 1024, "LT": 10240}
UTF8 = "ISO_IR 192"
_CS_ALLOWED = re.compile(r"[^A-Z0-9 _]")


def truncate(text: str, vr: str) -> str:
    """``text`` cut to the VR's length limit, with an ellipsis when cut; backslashes become '/'.

    Backslash is the value separator in every string VR but UT/LT/ST, so a label carrying one would
    silently become two values.
    """
    limit = VR_MAX_CHARS[vr]
    clean = " ".join(text.replace("\\", "/").split())
    if len(clean) <= limit:
        return clean
    return clean[: limit - 3].rstrip() + "..."


def code_string(text: str, max_chars: int = 16) -> str:
    """A valid CS value: upper case letters, digits, space and underscore, at most ``max_chars``."""
    value = _CS_ALLOWED.sub("_", text.upper().replace("-", "_"))
    value = re.sub(r"_+", "_", value).strip(" _")[:max_chars].strip(" _")
    if not value:
        raise ValueError(f"text {text!r} has no character usable in a DICOM Code String")
    return value


def character_set_for(source: pydicom.Dataset, texts: Iterable[str]) -> str | list[str]:
    """The Specific Character Set for our objects: the source's when it can encode every text, else UTF-8.

    Keeping the source's set keeps patient names byte-comparable for PACS that match on bytes; a
    report in a script the source's set cannot hold (e.g. Greek text for an ISO_IR 100 study) switches
    the object to ISO_IR 192, which can hold the decoded patient name too.
    """
    declared = source.get("SpecificCharacterSet", "ISO_IR 6") or "ISO_IR 6"
    charsets = [declared] if isinstance(declared, str) else list(declared)
    encodings = convert_encodings(charsets)
    for text in texts:
        if text.isascii():
            continue
        if not _encodable(text, encodings):
            return UTF8
    if charsets == ["ISO_IR 6"] or charsets == [""]:
        return "ISO_IR 6"
    return charsets[0] if len(charsets) == 1 else charsets


def _encodable(text: str, encodings: list[str]) -> bool:
    for encoding in encodings:
        try:
            _encode_string_impl(text, encoding)
            return True
        except UnicodeError:
            continue
    if len(encodings) > 1:
        try:
            _encode_string_parts(text, encodings)
            return True
        except ValueError:
            return False
    return False
