"""Text that goes into DICOM attributes: VR length limits, Code String rules, character sets."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

import pydicom
from pydicom.charset import _encode_string_impl, _encode_string_parts, convert_encodings

from inference.result import REGION_NAMES, SPECIAL_TOKEN, unusable_text_reason

#: Maximum characters per value (PS3.5 table 6.2-1) for the VRs we write free text into.
VR_MAX_CHARS = {"CS": 16, "SH": 16, "LO": 64, "ST": 1024, "LT": 10240}
UTF8 = "ISO_IR 192"
_CS_ALLOWED = re.compile(r"[^A-Z0-9 _]")


#: What a degenerate model text is replaced with wherever it would be shown.
NOT_USABLE = "model output not usable"
#: Control characters UT, LT and ST may hold (PS3.5 6.1.3: CR, LF, FF, TAB); every other one is removed.
_TEXT_CONTROLS_ALLOWED = {"\r", "\n", "\f", "\t"}
_OBJECT_TOKEN = re.compile(r"<obj_(\d{1,2})>")


def clean_model_text(text: str, multiline: bool = True) -> str:
    """Model text made safe for DICOM: special tokens out (``<obj_i>`` becomes the region's name), no
    control character (but CR/LF/FF/TAB when ``multiline``), no U+FFFD, no unpaired surrogate."""

    def region(match: re.Match[str]) -> str:
        index = int(match.group(1))
        return REGION_NAMES[index] if index < len(REGION_NAMES) else " "

    text = SPECIAL_TOKEN.sub(" ", _OBJECT_TOKEN.sub(region, text or ""))
    kept = []
    for char in text:
        category = unicodedata.category(char)
        if char == "\ufffd" or category in ("Cs", "Co", "Cn"):
            continue
        if category == "Cc" and not (multiline and char in _TEXT_CONTROLS_ALLOWED):
            kept.append(" ")
            continue
        kept.append(char)
    text = "".join(kept)
    text = re.sub(r"[ \t]{2,}", " ", text)
    return text.strip()


def usable_model_text(text: str, multiline: bool = True) -> tuple[str, str | None]:
    """(text to write, reason) where a degenerate text becomes :data:`NOT_USABLE` and reason says why."""
    reason = unusable_text_reason(text or "")
    if reason is not None:
        return f"{NOT_USABLE} ({reason})", reason
    cleaned = clean_model_text(text, multiline)
    return (cleaned, None) if cleaned else (f"{NOT_USABLE} (empty)", "empty")


def truncate(text: str, vr: str) -> str:
    """``text`` cut to the VR's length limit, with an ellipsis when cut; backslashes become '/'.

    Backslash is the value separator in every string VR but UT/LT/ST, so a label carrying one would
    silently become two values.
    """
    limit = VR_MAX_CHARS[vr]
    clean = " ".join(clean_model_text(text, multiline=False).replace("\\", "/").split())
    if len(clean) <= limit:
        return clean
    cut = clean[: limit - 3]
    if " " in cut[limit // 2 :]:
        cut = cut[: cut.rindex(" ")]  # never cut mid-word when a word boundary is near
    return cut.rstrip(" ,;:-") + "..."


def code_string(text: str, max_chars: int = 16) -> str:
    """A valid CS value: upper case letters, digits, space and underscore, at most ``max_chars``."""
    value = _CS_ALLOWED.sub("_", text.upper().replace("-", "_"))
    value = re.sub(r"_+", "_", value).strip(" _")[:max_chars].strip(" _")
    if not value:
        raise ValueError(f"text {text!r} has no character usable in a DICOM Code String")
    return value


def character_set_for(source: pydicom.Dataset, texts: Iterable[str]) -> str | list[str] | None:
    """The Specific Character Set for our objects: the source's when it can encode every text, else UTF-8.

    None (leave the attribute out) for the default repertoire: "ISO_IR 6" is not a defined term of
    Specific Character Set; its absence means the default repertoire.

    Keeping the source's set keeps patient names byte-comparable for PACS that match on bytes; a
    report in a script the source's set cannot hold (e.g. Greek text for an ISO_IR 100 study) switches
    the object to ISO_IR 192, which can hold the decoded patient name too.
    """
    declared = source.get("SpecificCharacterSet", "ISO_IR 6") or "ISO_IR 6"
    charsets = [declared] if isinstance(declared, str) else list(declared)
    if charsets in (["ISO_IR 6"], [""]):
        return None if all(text.isascii() for text in texts) else UTF8
    encodings = convert_encodings(charsets)
    for text in texts:
        if text.isascii():
            continue
        if not _encodable(text, encodings):
            return UTF8
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
