"""WADO-RS (PS3.18 section 10.4) over the node's stored objects: what a retrieve answers, part by part.

* **Instances** (study, series or one instance): ``multipart/related; type="application/dicom"``, one
  part per object, each the stored file's bytes as they are (read in chunks, never a whole study in
  memory). A client that names a transfer syntax gets the stored bytes when they are in it (or
  ``transfer-syntax=*``), Explicit VR Little Endian decoded by pydicom when it asks for that, and 406
  otherwise. Without a ``transfer-syntax`` parameter the stored syntax is sent (as Orthanc does, and
  the ``Content-Type`` of each part says which), so a worker reads exactly the bytes the modality sent.
* **Metadata**: ``application/dicom+json``, each object's header with ``PixelData`` as a
  ``BulkDataURI`` and ``AvailableTransferSyntaxUID`` set to the stored syntax.
* **Frames** (``/frames/1,2``): ``multipart/related; type="application/octet-stream"``, one part per
  frame; with ``transfer-syntax=*`` (what OHIF's image loader asks for) a compressed frame is sent as
  stored, its part's ``Content-Type`` naming the syntax; otherwise frames are decoded to native pixels.
* **Bulk data** (``/bulkdata/7FE00010``): the frames of the pixel data, as for ``/frames``.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.dicomweb.catalog import StoredObject

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET_STREAM = "application/octet-stream"
MULTIPART = "multipart/related"
CHUNK = 1 << 20
#: Syntaxes whose pixel data is native (the pixel bytes are the same little-endian values).
NATIVE_SYNTAXES = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, "1.2.840.10008.1.2.1.99"})
#: Explicit VR Big Endian (retired): its native frames are decoded to little endian, never sent as stored.
BIG_ENDIAN = "1.2.840.10008.1.2.2"
PIXEL_DATA_TAG = "7FE00010"


class NotAcceptable(ValueError):
    """No media type or transfer syntax in the request's Accept header can be served (HTTP 406)."""


class NoSuchFrame(LookupError):
    """A frame number beyond the instance's frames (HTTP 404)."""


@dataclass(frozen=True)
class MediaRange:
    """One entry of an Accept header: ``type/subtype`` and its parameters (lower-case names, unquoted)."""

    media_type: str
    params: dict[str, str]

    @property
    def transfer_syntax(self) -> str | None:
        return self.params.get("transfer-syntax")

    def matches(self, media_type: str) -> bool:
        major, _, minor = self.media_type.partition("/")
        wanted_major, _, wanted_minor = media_type.partition("/")
        return major in ("*", wanted_major) and minor in ("*", wanted_minor)


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an Accept header, in order of preference (q=0 ranges dropped); ``*/*`` when absent."""
    if not header or not header.strip():
        return [MediaRange("*/*", {})]
    ranges: list[tuple[float, int, MediaRange]] = []
    for position, item in enumerate(_split_outside_quotes(header, ",")):
        pieces = _split_outside_quotes(item, ";")
        media_type = pieces[0].strip().lower()
        if not media_type:
            continue
        params: dict[str, str] = {}
        for piece in pieces[1:]:
            name, _, value = piece.partition("=")
            params[name.strip().lower()] = value.strip().strip('"')
        try:
            quality = float(params.pop("q", "1"))
        except ValueError:
            quality = 1.0
        if quality > 0:
            ranges.append((-quality, position, MediaRange(media_type, params)))
    return [r for _, _, r in sorted(ranges, key=lambda t: (t[0], t[1]))]


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


# ---- instances ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceChoice:
    """How instances are answered: multipart or one single-part object, and the transfer syntax asked for (None: as stored)."""

    multipart: bool
    transfer_syntax: str | None


def choose_instance_media(accept: list[MediaRange], single_object: bool) -> InstanceChoice:
    """The first acceptable way to send DICOM objects, or NotAcceptable."""
    for media in accept:
        if media.matches(MULTIPART) and media.params.get("type", DICOM).lower() in (DICOM, "*/*", "application/*"):
            return InstanceChoice(True, _wanted_syntax(media))
        if single_object and media.media_type == DICOM:
            return InstanceChoice(False, _wanted_syntax(media))
    offered = 'multipart/related; type="application/dicom"' + (" or application/dicom" if single_object else "")
    raise NotAcceptable(f"this resource is offered as {offered}; the request accepts {_describe(accept)}")


def _wanted_syntax(media: MediaRange) -> str | None:
    syntax = media.transfer_syntax
    return None if syntax in (None, "", "*") else syntax


def check_transcodable(objects: Iterable[StoredObject], transfer_syntax: str | None) -> None:
    """NotAcceptable unless each object is in ``transfer_syntax`` already or can be decoded to it."""
    if transfer_syntax is None:
        return
    for obj in objects:
        if obj.transfer_syntax_uid == BIG_ENDIAN and transfer_syntax != BIG_ENDIAN:
            raise NotAcceptable(f"instance {obj.sop_instance_uid} is stored as Explicit VR Big Endian (retired), which the node sends "
                                "only as stored (transfer-syntax=* or 1.2.840.10008.1.2.2)")  # fmt: skip
        if obj.transfer_syntax_uid != transfer_syntax and transfer_syntax != ExplicitVRLittleEndian:
            raise NotAcceptable(
                f"instance {obj.sop_instance_uid} is stored as {obj.transfer_syntax_uid} and can be sent in that syntax "
                f"(transfer-syntax=* or {obj.transfer_syntax_uid}) or decoded to {ExplicitVRLittleEndian}, not in {transfer_syntax}"
            )


def instance_bytes(obj: StoredObject, transfer_syntax: str | None) -> Iterator[bytes]:
    """The object's Part 10 bytes in chunks: the stored file, or decoded to Explicit VR Little Endian."""
    if transfer_syntax is None or transfer_syntax == obj.transfer_syntax_uid:
        yield from _file_chunks(obj.path)
        return
    yield explicit_little_endian(obj.path)


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            yield chunk


def explicit_little_endian(path: Path) -> bytes:
    """The file re-encoded as Explicit VR Little Endian (compressed pixel data decoded; same SOP Instance UID)."""
    dataset = pydicom.dcmread(path)
    if dataset.file_meta.TransferSyntaxUID.is_compressed:
        dataset.decompress(generate_instance_uid=False)
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


def dicom_part_type(obj: StoredObject, transfer_syntax: str | None) -> str:
    return f"{DICOM}; transfer-syntax={transfer_syntax or obj.transfer_syntax_uid}"


def multipart_body(parts: Iterable[tuple[str, Iterable[bytes]]], boundary: str) -> Iterator[bytes]:
    """A multipart/related body, streamed: each part's headers, then its chunks (RFC 2046)."""
    delimiter = f"--{boundary}".encode()
    first = True
    for content_type, chunks in parts:
        yield (b"" if first else b"\r\n") + delimiter + f"\r\nContent-Type: {content_type}\r\n\r\n".encode()
        first = False
        yield from chunks
    yield (b"" if first else b"\r\n") + delimiter + b"--\r\n"


def new_boundary() -> str:
    return f"anatomix-{secrets.token_hex(12)}"


def multipart_type(part_type: str, boundary: str) -> str:
    return f'{MULTIPART}; type="{part_type}"; boundary={boundary}'


# ---- metadata ----------------------------------------------------------------------------------------------


def metadata_json(obj: StoredObject, instance_url: str) -> dict[str, Any]:
    """The object's DICOM JSON (PS3.18 F.2): its header, PixelData as a BulkDataURI under ``instance_url``."""
    header = obj.header()
    body = header.to_json_dict(bulk_data_threshold=1 << 30, suppress_invalid_tags=True)
    body["00083002"] = {"vr": "UI", "Value": [obj.transfer_syntax_uid]}  # AvailableTransferSyntaxUID
    if has_pixel_data(header):
        body[PIXEL_DATA_TAG] = {"vr": "OW" if int(header.get("BitsAllocated", 8)) > 8 else "OB",
                                "BulkDataURI": f"{instance_url}/bulkdata/{PIXEL_DATA_TAG}"}  # fmt: skip
    return dict(sorted(body.items()))


def has_pixel_data(header: Dataset) -> bool:
    """An image (Rows and Columns are set): its file ends in PixelData, which the header stops before."""
    return "Rows" in header and "Columns" in header


# ---- frames ------------------------------------------------------------------------------------------------


def parse_frame_list(text: str) -> list[int]:
    """``1,3,5`` -> [1, 3, 5] (1-based); ValueError for anything else."""
    numbers = []
    for piece in text.split(","):
        piece = piece.strip()
        if not piece.isdigit() or int(piece) < 1:
            raise ValueError(f"frame numbers are positive integers separated by commas, not {text!r}")
        numbers.append(int(piece))
    return numbers


def choose_frame_syntax(accept: list[MediaRange], stored: str) -> str:
    """The transfer syntax to send frames in: the stored one, or Explicit VR Little Endian (decoded); else NotAcceptable."""
    native = stored in NATIVE_SYNTAXES
    if stored == BIG_ENDIAN:
        stored = ExplicitVRLittleEndian  # decoded: pydicom swaps the bytes
    for media in accept:
        if media.matches(MULTIPART):
            part = media.params.get("type", OCTET_STREAM).lower()
            if part not in (OCTET_STREAM, "*/*", "application/*"):
                continue
            wanted = media.transfer_syntax
            if wanted == "*" or wanted == stored or (native and wanted in (None, ExplicitVRLittleEndian)):
                return ExplicitVRLittleEndian if native else stored
            if wanted in (None, ExplicitVRLittleEndian):
                return ExplicitVRLittleEndian
        elif media.media_type == OCTET_STREAM and (native or media.transfer_syntax in ("*", stored)):
            return ExplicitVRLittleEndian if native else stored
    raise NotAcceptable(f"frames are offered as multipart/related; type=\"application/octet-stream\" (stored as {stored}, "
                        f"or decoded with transfer-syntax={ExplicitVRLittleEndian}); the request accepts {_describe(accept)}")  # fmt: skip


def frame_count(header: Dataset) -> int:
    return int(header.get("NumberOfFrames", 1) or 1)


def read_frames(obj: StoredObject, numbers: list[int], transfer_syntax: str) -> list[bytes]:
    """The frames (1-based numbers) in ``transfer_syntax`` (the stored syntax, or decoded to native)."""
    header = obj.header()
    count = frame_count(header)
    missing = [n for n in numbers if n > count]
    if missing:
        raise NoSuchFrame(f"instance {obj.sop_instance_uid} has {count} frame(s); there is no frame {missing[0]}")
    dataset = pydicom.dcmread(obj.path)
    stored = UID(obj.transfer_syntax_uid)
    if stored in NATIVE_SYNTAXES:
        return [_native_frame(dataset, n - 1) for n in numbers]
    if transfer_syntax == stored:
        offsets = _extended_offsets(dataset)
        return [get_frame(dataset.PixelData, n - 1, number_of_frames=count, extended_offsets=offsets) for n in numbers]
    from pydicom.pixels import pixel_array

    return [_le_bytes(pixel_array(dataset, index=n - 1)) for n in numbers]


def _native_frame(dataset: Dataset, index: int) -> bytes:
    bits = int(dataset.BitsAllocated)
    if bits == 1:
        from pydicom.pixels import pack_bits, pixel_array

        return pack_bits(pixel_array(dataset, index=index))
    data = dataset.PixelData
    size = int(dataset.Rows) * int(dataset.Columns) * int(dataset.get("SamplesPerPixel", 1)) * (bits // 8)
    return bytes(data[index * size : (index + 1) * size])


def _le_bytes(array: Any) -> bytes:
    return bytes(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())


def _extended_offsets(dataset: Dataset) -> tuple[bytes, bytes] | None:
    if "ExtendedOffsetTable" in dataset and "ExtendedOffsetTableLengths" in dataset:
        return dataset.ExtendedOffsetTable, dataset.ExtendedOffsetTableLengths
    return None


def frame_part_type(transfer_syntax: str) -> str:
    return f"{OCTET_STREAM}; transfer-syntax={transfer_syntax}"


def _describe(accept: list[MediaRange]) -> str:
    return ", ".join(m.media_type + "".join(f"; {k}={v}" for k, v in m.params.items()) for m in accept) or "nothing"
