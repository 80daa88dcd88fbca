"""Header-only checks of a received C-STORE data set: what the SCP needs, nothing decoded.

Two passes, both cheap (no pixel decoding, values of large elements never touched):

1. :func:`check_structure` hops over every element header of the encoded data set (nested
   sequences and encapsulated pixel fragments included) and proves that each declared length fits
   in the bytes received: truncated transfers, garbage and broken delimiters are found here.
2. :func:`parse_instance_header` reads the few attributes the node records (SOP Class/Instance,
   Study, Series UIDs) and compares them with the C-STORE command.

A failure raises :class:`MalformedDataset` with the DIMSE status to answer and a reason that names
elements by tag and never quotes a value that could carry patient data.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

from dicom_node.store.spool import is_valid_uid

#: DIMSE statuses of the Storage service (PS3.4 Annex B.2.3).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
#: "Unable to process": our own failure while handling a valid request (logged with the cause).
STATUS_PROCESSING_FAILURE = 0xC211

_UNDEFINED = 0xFFFFFFFF
_ITEM = (0xFFFE, 0xE000)
_ITEM_END = (0xFFFE, 0xE00D)
_SEQUENCE_END = (0xFFFE, 0xE0DD)
#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_MAX_DEPTH = 32


class MalformedDataset(ValueError):
    """The data set cannot be stored as it is; ``status`` is the DIMSE status to answer."""

    def __init__(self, reason: str, status: int = STATUS_CANNOT_UNDERSTAND) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class InstanceHeader:
    """The identifying attributes of a received instance."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    #: Why the pixel data cannot be what the header describes (stored, but flagged), or None.
    pixel_problem: str | None = None


# ---- pass 1: structure -------------------------------------------------------------------------


class _Walker:
    """Walks element headers of an encoded data set without decoding values."""

    def __init__(self, data: bytes | memoryview, implicit_vr: bool, little_endian: bool) -> None:
        self.data = data
        self.implicit_vr = implicit_vr
        self.endian = "<" if little_endian else ">"
        #: Top-level (7FE0,0010): byte length of native pixel data, or number of fragments when encapsulated.
        self.pixel_data: tuple[str, int] | None = None
        self.fragments = 0
        #: Offset of the first top-level element from (7FE0,0008) on (bulk data), or None.
        self.bulk_at: int | None = None

    def fail(self, offset: int, message: str) -> MalformedDataset:
        return MalformedDataset(f"data set damaged at byte {offset}: {message}")

    def read_tag(self, offset: int) -> tuple[int, int]:
        if offset + 4 > len(self.data):
            raise self.fail(offset, f"element header cut off ({len(self.data) - offset} bytes left)")
        return struct.unpack_from(self.endian + "HH", self.data, offset)

    def walk_elements(self, offset: int, end: int, depth: int, stop_at: tuple[int, int] | None) -> int:
        """Check elements from ``offset`` to ``end`` (or to the ``stop_at`` delimiter); return the end offset."""
        if depth > _MAX_DEPTH:
            raise self.fail(offset, f"sequences nested deeper than {_MAX_DEPTH}")
        previous = (-1, -1)
        while offset < end:
            tag = self.read_tag(offset)
            if stop_at is not None and tag == stop_at:
                return offset + 8  # delimiter tag + 4-byte zero length
            if tag[0] == 0xFFFE:
                raise self.fail(offset, f"unexpected delimiter ({tag[0]:04X},{tag[1]:04X}) among elements")
            if depth == 0 and tag <= previous:
                raise self.fail(offset, f"element ({tag[0]:04X},{tag[1]:04X}) out of ascending tag order")
            if depth == 0 and self.bulk_at is None and tag >= (0x7FE0, 0x0008):
                self.bulk_at = offset
            previous = tag
            offset = self.walk_element(offset, tag, end, depth)
        if stop_at is not None:
            raise self.fail(offset, "undefined-length item ends without its delimiter")
        return offset

    def walk_element(self, offset: int, tag: tuple[int, int], end: int, depth: int) -> int:
        if self.implicit_vr:
            if offset + 8 > end:
                raise self.fail(offset, f"element ({tag[0]:04X},{tag[1]:04X}) header cut off")
            (length,) = struct.unpack_from(self.endian + "L", self.data, offset + 4)
            vr, value_at = None, offset + 8
        else:
            if offset + 8 > end:
                raise self.fail(offset, f"element ({tag[0]:04X},{tag[1]:04X}) header cut off")
            vr = bytes(self.data[offset + 4 : offset + 6])
            if not (vr.isalpha() and vr.isupper()):
                raise self.fail(offset, f"element ({tag[0]:04X},{tag[1]:04X}) has no valid VR (bytes {vr.hex()})")
            if vr in _LONG_VRS:
                if offset + 12 > end:
                    raise self.fail(offset, f"element ({tag[0]:04X},{tag[1]:04X}) header cut off")
                (length,) = struct.unpack_from(self.endian + "L", self.data, offset + 8)
                value_at = offset + 12
            else:
                (length,) = struct.unpack_from(self.endian + "H", self.data, offset + 6)
                value_at = offset + 8
        if length == _UNDEFINED:
            if tag == (0x7FE0, 0x0010):
                after = self.walk_items(value_at, end, depth + 1, fragments=True, delimited=True)
                if depth == 0:
                    self.pixel_data = ("encapsulated", self.fragments)
                return after
            if vr not in (None, b"SQ", b"UN"):
                raise self.fail(offset, f"element ({tag[0]:04X},{tag[1]:04X}) VR {vr.decode()} cannot have undefined length")
            if vr == b"UN":
                # PS3.5 6.2.2: an undefined-length UN holds a sequence encoded as implicit VR little endian.
                inner = _Walker(self.data, implicit_vr=True, little_endian=True)
                return inner.walk_items(value_at, end, depth + 1, fragments=False, delimited=True)
            return self.walk_items(value_at, end, depth + 1, fragments=False, delimited=True)
        if value_at + length > end:
            raise self.fail(offset, f"element ({tag[0]:04X},{tag[1]:04X}) declares {length} bytes but only {end - value_at} remain")
        if vr == b"SQ" and length:
            self.walk_items(value_at, value_at + length, depth + 1, fragments=False, delimited=False)
        if tag == (0x7FE0, 0x0010) and depth == 0:
            self.pixel_data = ("native", length)
        return value_at + length

    def walk_items(self, offset: int, end: int, depth: int, fragments: bool, delimited: bool) -> int:
        """Items of a sequence (or fragments of encapsulated pixel data) up to ``end`` or the delimiter."""
        if fragments:
            self.fragments = 0
        while offset < end:
            tag = self.read_tag(offset)
            if tag == _SEQUENCE_END:
                return offset + 8
            if tag != _ITEM:
                raise self.fail(offset, f"expected an item, found ({tag[0]:04X},{tag[1]:04X})")
            if offset + 8 > end:
                raise self.fail(offset, "item header cut off")
            (length,) = struct.unpack_from(self.endian + "L", self.data, offset + 4)
            offset += 8
            if length == _UNDEFINED:
                if fragments:
                    raise self.fail(offset, "pixel data fragment with undefined length")
                offset = self.walk_elements(offset, end, depth + 1, stop_at=_ITEM_END)
            else:
                if offset + length > end:
                    what = "pixel data fragment" if fragments else "sequence item"
                    raise self.fail(offset, f"{what} declares {length} bytes but only {end - offset} remain")
                if not fragments and length:
                    self.walk_elements(offset, offset + length, depth + 1, stop_at=None)
                offset += length
                if fragments:
                    self.fragments += 1
        if delimited and fragments:
            raise self.fail(offset, "encapsulated pixel data ends without its sequence delimiter (truncated)")
        if delimited:
            raise self.fail(offset, "undefined-length sequence ends without its delimiter")
        return offset


#: An encoded data set: bytes as received, or a view of a file (a STOW-RS part, memory-mapped).
Encoded = bytes | memoryview


def inflate_dataset(dataset_bytes: Encoded, transfer_syntax: UID) -> Encoded:
    """The data set as plain explicit VR little endian bytes when it was deflated, else unchanged."""
    if not transfer_syntax.is_deflated:
        return dataset_bytes
    try:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        inflated = inflater.decompress(dataset_bytes) + inflater.flush()
    except zlib.error as exc:
        raise MalformedDataset(f"deflated data set does not inflate: {exc}") from None
    if not inflater.eof:
        raise MalformedDataset("deflated data set is truncated (the deflate stream does not end)")
    return inflated


def check_structure(dataset_bytes: Encoded, transfer_syntax: UID) -> tuple[str, int] | None:
    """Raise MalformedDataset unless every element of the encoded data set fits in the bytes received.

    ``dataset_bytes`` are already inflated (:func:`inflate_dataset`). Returns what the top-level
    Pixel Data holds: ("native", byte length) or ("encapsulated", number of items including the
    Basic Offset Table), None without pixel data.
    """
    if not dataset_bytes:
        raise MalformedDataset("the data set is empty")
    return _walk(dataset_bytes, transfer_syntax).pixel_data


def _walk(dataset_bytes: Encoded, transfer_syntax: UID) -> _Walker:
    if not dataset_bytes:
        raise MalformedDataset("the data set is empty")
    walker = _Walker(dataset_bytes, transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian)
    walker.walk_elements(0, len(dataset_bytes), depth=0, stop_at=None)
    return walker


# ---- pass 2: identifying attributes -------------------------------------------------------------

_HEADER_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Rows",
    "Columns",
    "BitsAllocated",
    "SamplesPerPixel",
    "NumberOfFrames",
]

_HEADER_TAG_NUMBERS: list[BaseTag | int] = [Tag(keyword) for keyword in _HEADER_TAGS]


def check_pixel_data(dataset: pydicom.Dataset, pixel_data: tuple[str, int] | None) -> str | None:
    """Compare the Pixel Data element with the image geometry; a reason when they cannot match."""
    if pixel_data is None:
        return None
    kind, amount = pixel_data
    if kind == "encapsulated":
        return "encapsulated pixel data holds no fragment" if amount < 2 else None
    try:
        rows, columns = int(dataset.get("Rows") or 0), int(dataset.get("Columns") or 0)
        bits = int(dataset.get("BitsAllocated") or 0)
        samples = int(dataset.get("SamplesPerPixel") or 1)
        frames = int(dataset.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return "image geometry (Rows, Columns, Bits Allocated, Samples, Frames) is not numeric"
    if not (rows and columns and bits):
        return "pixel data present but Rows, Columns or Bits Allocated missing"
    needed = (rows * columns * samples * frames * bits + 7) // 8
    if amount < needed:
        return f"native pixel data has {amount} bytes; {rows}x{columns}x{samples}x{frames} at {bits} bits needs {needed}"
    return None


def _read_uid(dataset: pydicom.Dataset, keyword: str) -> str:
    try:
        value = dataset.get(keyword)
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise MalformedDataset(f"{keyword} cannot be read: {type(exc).__name__}") from None
    if value is None or str(value).strip("\0 ") == "":
        raise MalformedDataset(f"required attribute {keyword} is missing or empty")
    uid = str(value).strip("\0 ")
    if not is_valid_uid(uid):
        # UIDs carry no patient data; quoting (a bounded prefix of) the value helps the sender's admin.
        raise MalformedDataset(f"{keyword} {uid[:64]!r} is not a valid UID (digits and dots, at most 64 characters)")
    return uid


def _is_bulk_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag >= 0x7FE00008  # Float/Double Float/Pixel Data and anything after: not needed here


def parse_instance_header(dataset_bytes: Encoded, transfer_syntax: UID, affected_sop_class_uid: str, affected_sop_instance_uid: str) -> InstanceHeader:
    """Read the identifying UIDs (no pixel data) and check them against the C-STORE request
    (for STOW-RS: against the part's File Meta Information)."""
    plain = inflate_dataset(dataset_bytes, transfer_syntax)
    walker = _walk(plain, transfer_syntax)
    pixel_data = walker.pixel_data
    if not isinstance(plain, bytes):
        # A view of a file: copy only the elements before the bulk data (BytesIO copies what it gets).
        plain = bytes(plain[: walker.bulk_at if walker.bulk_at is not None else len(plain)])
    deflated = transfer_syntax.is_deflated
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a non-conformant value elsewhere is not our concern here
            # BytesIO over bytes shares the buffer: no copy of the pixel data.
            dataset = read_dataset(
                io.BytesIO(plain),
                is_implicit_VR=False if deflated else transfer_syntax.is_implicit_VR,
                is_little_endian=True if deflated else transfer_syntax.is_little_endian,
                stop_when=_is_bulk_data,
                specific_tags=_HEADER_TAG_NUMBERS,
            )
    except (InvalidDicomError, EOFError, ValueError, struct.error, NotImplementedError) as exc:
        raise MalformedDataset(f"data set cannot be parsed: {type(exc).__name__}") from None
    header = InstanceHeader(
        sop_class_uid=_read_uid(dataset, "SOPClassUID"),
        sop_instance_uid=_read_uid(dataset, "SOPInstanceUID"),
        study_instance_uid=_read_uid(dataset, "StudyInstanceUID"),
        series_instance_uid=_read_uid(dataset, "SeriesInstanceUID"),
        pixel_problem=check_pixel_data(dataset, pixel_data),
    )
    if header.sop_class_uid != affected_sop_class_uid.strip("\0 "):
        raise MalformedDataset(
            f"data set SOP Class UID {header.sop_class_uid} differs from the C-STORE request's {affected_sop_class_uid}",
            STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
        )
    if header.sop_instance_uid != affected_sop_instance_uid.strip("\0 "):
        raise MalformedDataset(
            f"data set SOP Instance UID {header.sop_instance_uid} differs from the C-STORE request's {affected_sop_instance_uid}",
            STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
        )
    return header
