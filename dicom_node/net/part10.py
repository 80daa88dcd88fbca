"""The Part 10 header (preamble, ``DICM``, File Meta group) written in front of each received data set.

The bytes are the same as pynetdicom's ``encode_file_meta(event.file_meta)``: the same seven
elements, with pynetdicom's implementation UID and version name. We encode them directly because
building and writing a pydicom ``FileMetaDataset`` cost about a third of the C-STORE handler's CPU
time per small instance (profiled: 19,200 attribute sets and 10,000 UID validations per 300
instances). The layout is fixed by PS3.10 7.1: explicit VR little endian, group length first.
"""

from __future__ import annotations

import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

PREAMBLE = b"\x00" * 128 + b"DICM"


def _short(element: int, vr: bytes, value: bytes) -> bytes:
    """An element with a 2-byte length (UI, SH, AE, UL) in group 0002."""
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _ui(element: int, uid: str) -> bytes:
    value = uid.encode("ascii")
    return _short(element, b"UI", value + b"\x00" * (len(value) % 2))


def _sh(element: int, text: str) -> bytes:
    value = text.encode("ascii")
    return _short(element, b"SH", value + b" " * (len(value) % 2))


_VERSION = struct.pack("<HH2s2xI", 0x0002, 0x0001, b"OB", 2) + b"\x00\x01"
_IMPLEMENTATION = _ui(0x0012, str(PYNETDICOM_IMPLEMENTATION_UID)) + _sh(0x0013, PYNETDICOM_IMPLEMENTATION_VERSION)


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble + ``DICM`` + File Meta Information for a data set received by C-STORE.

    The UIDs must be ASCII (the caller validates them before they reach the spool).
    """
    body = _VERSION + _ui(0x0002, sop_class_uid) + _ui(0x0003, sop_instance_uid) + _ui(0x0010, transfer_syntax_uid) + _IMPLEMENTATION
    return PREAMBLE + struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body
